"""The two reference runs of a prompt-pair batch, cached lazily: logits and the activations a sweep reads."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.hooked_model import HookedApertus
from workbench.patching.inputs import PromptPairs


class ReferenceRuns:
    """The unpatched "clean" and "corrupted" runs: full logits and any cached activations, each run once."""

    def __init__(self, model: HookedApertus, pairs: PromptPairs) -> None:
        self.model, self.pairs = model, pairs
        self.caches: dict[str, dict[str, torch.Tensor]] = {"clean": {}, "corrupted": {}}
        self._logits: dict[str, torch.Tensor] = {}
        self._points: tuple[str, ...] | None = None  # the model's hook points when the runs were made

    def logits(self, run: str) -> torch.Tensor:
        """Full logits [prompt, pos, vocab] of the unpatched "clean" or "corrupted" run."""
        if run not in self._logits:
            self.ensure(run, [])
        return self._logits[run]

    def activations(self, run: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
        self.ensure(run, names)
        return {n: self.caches[run][n] for n in names}

    def ensure(self, run: str, names: Sequence[str]) -> None:
        self._check_same_model()
        missing = [n for n in dict.fromkeys(names) if n not in self.caches[run]]
        if not missing and run in self._logits:
            return
        with torch.no_grad():
            logits, cache = self.model.run_with_cache(
                self.pairs.tokens(run), names_filter=missing, attention_mask=self.pairs.mask
            )
        if self._points is None:
            self._points = tuple(self.model.hook_dict)
        # Keep the first logits: a later run that watches a pattern uses explicit attention (ulp-different).
        self._logits.setdefault(run, logits)
        self.caches[run].update({n: cache[n] for n in missing})

    def _check_same_model(self) -> None:
        # A splice adds hook points and changes what the model computes (without the error term): runs
        # cached before it would be mixed with patched runs after it.
        if self._points is not None and tuple(self.model.hook_dict) != self._points:
            raise ValueError(
                "The model's hook points changed since this experiment made its reference runs (an SAE "
                "spliced in or taken out?), so its cached clean and corrupted runs may no longer be the "
                "model's: build the PatchingExperiment inside the `with splice(...)` block you patch."
            )

    def clean_last_log_probs(self) -> torch.Tensor:
        """log p(next token) of the clean run at each prompt's last token, float64 [prompts, vocab]."""
        logits = self.logits("clean")
        return logits[torch.arange(self.pairs.n_prompts), self.pairs.last].double().log_softmax(-1)
