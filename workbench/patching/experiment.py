"""A clean/corrupted experiment: the prompt pairs, both reference runs, and the sweeps run on them.

The work lives in one module per seam: `inputs` (prompt pairs and answers), `runs` (the cached reference
runs), `metrics`, `sweeps` (which cells, in which chunks), `runner` (the batched patched forward) and
`attribution`; this class ties them to one prompt-pair batch and builds `PatchResult`s (which keep no
reference to it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.hooked_model import HookedApertus
from workbench.identity import model_identity
from workbench.patching import metrics, runner, sweeps
from workbench.patching.attribution import attribution_per_pair
from workbench.patching.components import (
    COMPONENTS,
    HOOK_KINDS,
    Cell,
    Component,
    Metric,
    Prompts,
    check_direction,
    component_spec,
    hook_component,
    runs_of,
)
from workbench.patching.forward import default_max_batch
from workbench.patching.inputs import PromptPairs, str_tokens
from workbench.patching.result import PatchResult
from workbench.patching.runs import ReferenceRuns


class PatchingExperiment:
    """A clean/corrupted prompt pair (or batch of pairs) ready to patch, with both runs cached lazily.

    clean, corrupted: texts, lists of texts (one pair per entry) or token tensors of equal shape.
    answers: what the built-in metrics score at each prompt's last token: a pair (correct, wrong) of
        strings or ids for all prompts, or one pair per prompt; for "answer_prob" a single answer works.
    """

    def __init__(
        self,
        model: HookedApertus,
        clean: Prompts,
        corrupted: Prompts,
        answers: Any = None,
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.pairs = PromptPairs.build(model, clean, corrupted, answers, attention_mask)
        self.runs = ReferenceRuns(model, self.pairs)
        self.prompts = {"clean": _texts(clean), "corrupted": _texts(corrupted), "answers": _plain(answers)}

    # The prompt pairs' fields, under the names the experiment always had.
    clean_tokens = property(lambda self: self.pairs.clean)
    corrupted_tokens = property(lambda self: self.pairs.corrupted)
    mask = property(lambda self: self.pairs.mask)
    last = property(lambda self: self.pairs.last)
    answer_ids = property(lambda self: self.pairs.answer_ids)
    wrong_ids = property(lambda self: self.pairs.wrong_ids)
    str_tokens = property(lambda self: self.pairs.str_tokens)
    n_prompts = property(lambda self: self.pairs.n_prompts)
    n_pos = property(lambda self: self.pairs.n_pos)

    def tokens(self, run: str) -> torch.Tensor:
        return self.pairs.tokens(run)

    def logits(self, run: str) -> torch.Tensor:
        """Full logits [prompt, pos, vocab] of the unpatched "clean" or "corrupted" run."""
        return self.runs.logits(run)

    def activations(self, run: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.runs.activations(run, names)

    # ------------------------------------------------------------------------------------------ metrics
    def metric_values(self, metric: Metric, logits: torch.Tensor, full: bool) -> torch.Tensor:
        """The metric of each variant, for logits of n_variants x n_prompts rows (last-token or full)."""
        return metrics.metric_values(metric, logits, full, self.runs)

    def baseline_per_pair(self, metric: Metric, run: str) -> torch.Tensor:
        """The metric of the unpatched clean or corrupted run, per prompt pair [pairs] (or [1])."""
        metric = metrics.check_metric(metric, self.pairs)
        with torch.no_grad():
            return metrics.per_pair_values(metric, self.logits(run), True, self.runs)[0].detach().cpu()

    def baseline(self, metric: Metric, run: str) -> float:
        """The metric of the unpatched clean or corrupted run."""
        return float(self.baseline_per_pair(metric, run).mean())

    # ------------------------------------------------------------------------------------------- sweeps
    def component(self, component: str | tuple) -> Component:
        """The Component a name stands for: one of COMPONENTS, or one hook point of a layer:
        `("sae_latents", sae)` (the latents of an SAE spliced in with `workbench.sae.splice`; also
        `"sae_latents_by_pos"`), `("hook", name)` (a whole hook point; also `"hook_by_pos"`), or their
        string form `"sae_latents:blocks.1.hook_resid_post"` (what a result's `component` says)."""
        if isinstance(component, str) and ":" not in component:
            return component_spec(component)
        return hook_component(
            self.model, component, lambda name: self.runs.activations("clean", [name])[name].shape[-1]
        )

    def cells(self, component: str | tuple, *, layer=None, layers=None, positions=None) -> list[Cell]:
        """Every cell of a component's sweep (neurons: of `layer`; restricted to `layers`/`positions`)."""
        spec = self.component(component)
        return sweeps.plan_cells(
            self.model, self.n_pos, spec, layer=layer, layers=layers, positions=positions
        )

    def run(
        self,
        component: str | tuple = "resid_pre",
        metric: Metric = "logit_diff",
        *,
        direction: str = "denoise",
        normalize: bool = True,
        layer: int | None = None,
        layers: Sequence[int] | None = None,
        positions: Sequence[int] | None = None,
        cells: Sequence[Cell] | None = None,
        max_batch: int | None = None,
        memory_budget: int | None = None,
        progress: bool = True,
        skip_identical: bool = True,
    ) -> PatchResult:
        """Exact activation patching of every cell, batched (see the package docstring).

        layer: the layer whose neurons a "neurons" sweep patches; layers/positions restrict the sweep;
        cells: patch exactly these cells instead (e.g. the top cells of an attribution sweep).
        For neurons, SAE latents and whole hook points (`("sae_latents", sae)`, `("hook", name)`: see
        `component`), `positions` are where each cell is patched (default: every position).
        max_batch: rows per forward (rounded up to whole variants of all prompt pairs); by default from
        memory_budget bytes, itself by default a quarter of the free memory.
        skip_identical: cells where the clean and corrupted activations are equal (e.g. every position
        before the first changed token) get the base run's metric without a forward: it is their patched run.
        """
        spec, metric = self.component(component), metrics.check_metric(metric, self.pairs)
        direction = check_direction(direction)
        sweeps.check_size("max_batch", max_batch, "rows per forward")
        sweeps.check_size("memory_budget", memory_budget, "bytes")
        neuron_positions = sweeps.neuron_positions(spec, positions, self.n_pos)
        if cells is None:
            cells = sweeps.plan_cells(
                self.model, self.n_pos, spec, layer=layer, layers=layers, positions=positions
            )
        else:
            cells = [tuple(int(i) for i in c) for c in cells]
            sweeps.check_cells(self.model, self.n_pos, spec, cells)
        full = callable(metric)
        base_pairs = self.baseline_per_pair(metric, runs_of(direction)[0])
        runner.prefetch(self.runs, spec, cells, neuron_positions)
        per_pair = base_pairs[None].repeat(len(cells), 1)
        todo = [
            i
            for i, c in enumerate(cells)
            if not skip_identical or runner.differs(self.runs, spec, c, neuron_positions)
        ]
        rows = max_batch or default_max_batch(self.model, self.n_pos, spec, full, memory_budget)
        chunks = sweeps.plan_chunks(spec, cells, todo, self.mask is not None, max(1, rows // self.n_prompts))
        for chunk in tqdm(
            chunks, desc=f"patching {spec.name}", disable=not progress or len(chunks) < 2, leave=False
        ):
            logits = runner.patched_logits(
                self.model, self.runs, spec, [cells[i] for i in chunk], direction, full, neuron_positions
            )
            per_pair[chunk] = metrics.per_pair_values(metric, logits, full, self.runs).cpu()
        return self._result(spec, metric, direction, normalize, "exact", cells, per_pair, base_pairs)

    def _result(self, spec, metric, direction, normalize, method, cells, per_pair, base_pairs) -> PatchResult:
        clean, corrupted = self.baseline(metric, "clean"), self.baseline(metric, "corrupted")
        if normalize and abs(clean - corrupted) < 1e-9 * max(1.0, abs(clean)):
            raise ValueError(
                f"The clean and corrupted runs score the same ({clean:.6g}) on this metric, so nothing "
                "can be normalised: choose prompts whose behaviour differs, or pass normalize=False."
            )
        cfg = self.model.cfg
        sizes = {"layer": cfg.n_layers, "pos": self.n_pos, "head": cfg.n_heads}
        sizes |= {"kv_head": cfg.n_key_value_heads, "neuron": cfg.d_mlp, **dict(spec.sizes)}
        return PatchResult(
            component=spec.name,
            metric=metrics.metric_name(metric),
            direction=direction,
            method=method,
            normalized=normalize,
            axes=("layer", *spec.axes),
            cells=list(cells),
            raw=per_pair.double().mean(1),
            clean_value=clean,
            corrupted_value=corrupted,
            str_tokens=self.str_tokens,
            sizes=sizes,
            kv_groups=cfg.n_heads // cfg.n_key_value_heads,
            per_pair=per_pair.double(),
            base_per_pair=base_pairs.double(),
            meta=self.describe() | ({"hook": spec.point} if spec.point is not None else {}),
        )

    def describe(self) -> dict[str, Any]:
        """What a saved result needs to say where it came from: the model's identity and the prompts."""
        return {"model_identity": model_identity(self.model), **self.prompts}

    # ------------------------------------------------------------------------------------ one patched run
    def patched_logits(
        self, component: str | tuple, cell: Cell, *, direction: str = "denoise", neuron_positions=None
    ):
        """Last-token logits [prompt, vocab] of the run with one cell patched."""
        spec = self.component(component)
        cell = tuple(int(i) for i in cell)
        sweeps.check_cells(self.model, self.n_pos, spec, [cell])
        direction = check_direction(direction)
        neuron_positions = sweeps.neuron_positions(spec, neuron_positions, self.n_pos)
        runner.prefetch(self.runs, spec, [cell], neuron_positions)
        return runner.patched_logits(self.model, self.runs, spec, [cell], direction, False, neuron_positions)

    def predictions(
        self, component: str | tuple, cell: Cell, *, direction: str = "denoise", k: int = 5, prompt: int = 0
    ) -> pd.DataFrame:
        """Top-k next tokens of one prompt's clean, corrupted and patched runs, side by side."""
        if not 0 <= prompt < self.n_prompts:
            raise IndexError(f"prompt {prompt} is out of range: there are {self.n_prompts} prompt pairs.")
        runs = {
            "clean": self.logits("clean")[prompt, self.last[prompt]],
            "corrupted": self.logits("corrupted")[prompt, self.last[prompt]],
            "patched": self.patched_logits(component, cell, direction=direction)[prompt],
        }
        frame = pd.DataFrame({"rank": range(1, k + 1)})
        for name, logits in runs.items():
            top = logits.float().softmax(-1).topk(k)
            frame[name] = str_tokens(self.model, top.indices)
            frame[f"{name} p"] = top.values.tolist()
        return frame.set_index("rank")

    # ------------------------------------------------------------------------------------- attribution
    def attribute(
        self,
        components: str | tuple | Sequence[str | tuple] = ("resid_pre", "attn_out", "mlp_out", "heads"),
        metric: Metric = "logit_diff",
        *,
        direction: str = "denoise",
        normalize: bool = True,
        layer: int | None = None,
    ) -> PatchResult | dict[str, PatchResult]:
        """Attribution patching: every cell of every component from one forward and backward of the base run.

        A cell's estimate is metric(base) + sum over the cell of (source - base) * d metric / d activation,
        the first-order Taylor expansion of exact patching; same result format (method="attribution").
        components: one name or hook-point component such as ("sae_latents", sae) (one result), several
        (a dict by name), or "all" (every named component; the neurons of `layer` only when a layer is
        given). The estimate is first-order: with "kl" and
        direction="noise" it is zero everywhere (KL to the clean run has zero gradient at the clean run).
        """
        if components == "all":
            components = [c for c in COMPONENTS if c != "neurons" or layer is not None]
        # One component: a name, or a (kind, hook) pair such as ("sae_latents", sae).
        single = isinstance(components, str) or (
            isinstance(components, tuple) and len(components) == 2 and components[0] in HOOK_KINDS
        )
        specs: list[Component] = [self.component(c) for c in ([components] if single else components)]
        metric, direction = metrics.check_metric(metric, self.pairs), check_direction(direction)
        cells = {s: sweeps.plan_cells(self.model, self.n_pos, s, layer=layer) for s in specs}
        base_pairs = self.baseline_per_pair(metric, runs_of(direction)[0])
        estimates = attribution_per_pair(self.model, self.runs, cells, metric, direction, base_pairs)
        results = {
            s.name: self._result(
                s, metric, direction, normalize, "attribution", cells[s], estimates[s.name], base_pairs
            )
            for s in specs
        }
        return results[specs[0].name] if single else results


def _texts(prompts: Prompts) -> list[str] | None:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        return None  # token ids: the saved result keeps its str_tokens
    return [str(p) for p in prompts]


def _plain(answers: Any) -> Any:
    if isinstance(answers, torch.Tensor):
        return answers.tolist()
    if isinstance(answers, tuple | list):
        return [_plain(a) for a in answers]
    return answers
