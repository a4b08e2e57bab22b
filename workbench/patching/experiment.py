"""A clean/corrupted experiment: the two reference runs, metrics, exact sweeps and attribution patching."""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.hooked_model import HookedApertus
from workbench.names import act_name
from workbench.patching.components import (
    COMPONENTS,
    METRICS,
    Cell,
    Component,
    Metric,
    Prompts,
    cell_index,
    check_direction,
    component_spec,
    shift_cell,
)
from workbench.patching.forward import (
    PrefixKV,
    default_max_batch,
    forward_from,
    forward_with_hooks,
    patch_hook,
)
from workbench.patching.inputs import pair_tokens, parse_answers, str_tokens
from workbench.patching.result import PatchResult


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
        self.clean_tokens, self.corrupted_tokens, self.mask = pair_tokens(
            model, clean, corrupted, attention_mask
        )
        self.n_prompts, self.n_pos = self.clean_tokens.shape
        device = self.clean_tokens.device
        if self.mask is None:
            self.last = torch.full((self.n_prompts,), self.n_pos - 1, dtype=torch.long, device=device)
        else:
            self.last = (torch.arange(self.n_pos, device=device) * self.mask).argmax(-1)
        self.answer_ids, self.wrong_ids = parse_answers(model, answers, self.n_prompts)
        self.str_tokens = str_tokens(model, self.clean_tokens[0])
        self._caches: dict[str, dict[str, torch.Tensor]] = {"clean": {}, "corrupted": {}}
        self._logits: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------------------- the two reference runs
    def tokens(self, run: str) -> torch.Tensor:
        return self.clean_tokens if run == "clean" else self.corrupted_tokens

    def logits(self, run: str) -> torch.Tensor:
        """Full logits [prompt, pos, vocab] of the unpatched "clean" or "corrupted" run."""
        if run not in self._logits:
            self._ensure(run, [])
        return self._logits[run]

    def activations(self, run: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
        self._ensure(run, names)
        return {n: self._caches[run][n] for n in names}

    def _ensure(self, run: str, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self._caches[run]]
        if not missing and run in self._logits:
            return
        with torch.no_grad():
            logits, cache = self.model.run_with_cache(
                self.tokens(run), names_filter=missing, attention_mask=self.mask
            )
        # Keep the first logits: a later run that watches a pattern uses explicit attention (ulp-different).
        self._logits.setdefault(run, logits)
        self._caches[run].update({n: cache[n] for n in missing})

    # ------------------------------------------------------------------------------------------ metrics
    def metric_values(self, metric: Metric, logits: torch.Tensor, full: bool) -> torch.Tensor:
        """The metric of each variant, for logits of n_variants x n_prompts rows (last-token or full)."""
        b = self.n_prompts
        if callable(metric):
            values = []
            for start in range(0, logits.shape[0], b):
                value = _metric_value(metric(logits[start : start + b]))
                if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != b):
                    raise ValueError(
                        f"The metric returned shape {tuple(value.shape)}: return a scalar or one value per "
                        f"prompt ([{b}]) from logits [prompts, pos, vocab]."
                    )
                values.append(value.mean())
            return torch.stack(values)
        rows = torch.arange(logits.shape[0], device=logits.device) % b
        last = (
            logits[torch.arange(logits.shape[0], device=logits.device), self.last[rows]] if full else logits
        )
        last = last.to(torch.promote_types(last.dtype, torch.float32))
        if metric == "logit_diff":
            per_row = last.gather(1, self.answer_ids[rows, None]) - last.gather(1, self.wrong_ids[rows, None])
        elif metric == "answer_prob":
            per_row = last.softmax(-1).gather(1, self.answer_ids[rows, None])
        else:  # KL(clean || patched) at the last token
            # In float64: near the clean run KL is a small difference of large sums.
            clean = self._clean_last_log_probs()[rows]
            per_row = (clean.exp() * (clean - last.double().log_softmax(-1))).sum(-1)
        return per_row.view(-1, b).double().mean(1)

    def _clean_last_log_probs(self) -> torch.Tensor:
        logits = self.logits("clean")
        return logits[torch.arange(self.n_prompts), self.last].double().log_softmax(-1)

    def _check_metric(self, metric: Metric) -> Metric:
        if callable(metric):
            return metric
        if metric not in METRICS:
            close = difflib.get_close_matches(str(metric), METRICS, n=1, cutoff=0.3)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown metric {metric!r}: use one of {', '.join(METRICS)} or a callable on logits.{hint}"
            )
        if metric in ("logit_diff", "answer_prob") and self.answer_ids is None:
            raise ValueError(
                f"The {metric!r} metric needs answers=(correct, wrong), e.g. answers=(' Mary', ' John')."
            )
        if metric == "logit_diff" and self.wrong_ids is None:
            raise ValueError("The 'logit_diff' metric needs a wrong answer too: answers=(correct, wrong).")
        return metric

    def baseline(self, metric: Metric, run: str) -> float:
        """The metric of the unpatched clean or corrupted run."""
        metric = self._check_metric(metric)
        return float(self.metric_values(metric, self.logits(run), full=True)[0])

    # ------------------------------------------------------------------------------------------- sweeps
    def cells(
        self,
        component: str,
        *,
        layer: int | None = None,
        layers: Sequence[int] | None = None,
        positions: Sequence[int] | None = None,
    ) -> list[Cell]:
        """Every cell of a component's sweep (neurons: of `layer`; restricted to `layers`/`positions`)."""
        spec = component_spec(component)
        model, cfg = self.model, self.model.cfg
        for what, given in (("layers", layers), ("positions", positions)):
            if given is not None and len(given) == 0:
                raise ValueError(
                    f"{what}=[] selects nothing to patch: pass None for all {what}, or at least one."
                )
        if spec.name == "neurons":
            if layer is None:
                raise ValueError(
                    f"Neuron sweeps patch the {cfg.d_mlp} neurons of one layer: "
                    f"pass layer=0..{cfg.n_layers - 1}."
                )
            chosen = [model.check_layer(layer)]
        else:
            chosen = (
                [model.check_layer(x) for x in layers] if layers is not None else list(range(cfg.n_layers))
            )
        pos = list(range(self.n_pos)) if positions is None else [self._check_pos(p) for p in positions]
        ranges = {
            "pos": pos,
            "head": range(cfg.n_heads),
            "kv_head": range(cfg.n_key_value_heads),
            "neuron": range(cfg.d_mlp),
        }
        cells: list[Cell] = [(x,) for x in chosen]
        for axis in spec.axes:
            cells = [(*c, i) for c in cells for i in ranges[axis]]
        return cells

    def _check_pos(self, p: int) -> int:
        if not isinstance(p, int) or not -self.n_pos <= p < self.n_pos:
            raise IndexError(
                f"Position {p!r} is out of range: the prompts have {self.n_pos} tokens (0..{self.n_pos - 1})."
            )
        return p % self.n_pos

    def run(
        self,
        component: str = "resid_pre",
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
        """Exact activation patching of every cell, batched (see the module docstring).

        layer: the layer whose neurons a "neurons" sweep patches; layers/positions restrict the sweep;
        cells: patch exactly these cells instead (e.g. the top cells of an attribution sweep).
        For neurons, `positions` are where each neuron is patched (default: every position).
        max_batch: rows per forward (rounded up to whole variants of all prompt pairs); by default from
        memory_budget bytes, itself by default a quarter of the free memory.
        skip_identical: cells where the clean and corrupted activations are equal (e.g. every position
        before the first changed token) get the base run's metric without a forward: it is their patched run.

        Each chunk starts at its lowest patched layer from the base run's cached residual stream, and a
        variant joins the batch at its own layer, so no layer is computed for a variant before its patch.
        """
        spec, metric = component_spec(component), self._check_metric(metric)
        direction = check_direction(direction)
        _check_size("max_batch", max_batch, "rows per forward")
        _check_size("memory_budget", memory_budget, "bytes")
        neuron_positions = self._neuron_positions(spec, positions)
        if cells is None:
            cells = self.cells(spec.name, layer=layer, layers=layers, positions=positions)
        else:
            cells = [tuple(int(i) for i in c) for c in cells]
            self._check_cells(spec, cells)
        full = callable(metric)
        base, source = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
        self._prefetch(spec, cells, neuron_positions)
        raw = torch.full((len(cells),), self.baseline(metric, base), dtype=torch.float64)
        todo = [
            i for i, c in enumerate(cells) if not skip_identical or self._differs(spec, c, neuron_positions)
        ]
        rows = max_batch or default_max_batch(self.model, self.n_pos, spec, full, memory_budget)
        per_chunk = max(1, rows // self.n_prompts)
        if "pos" in spec.axes and self.mask is None:
            # One group per position: each then runs only from its position on (see _suffix_start).
            at = 1 + spec.axes.index("pos")
            groups = [[i for i in todo if cells[i][at] == p] for p in sorted({cells[i][at] for i in todo})]
        else:
            groups = [todo]
        chunks = [g[i : i + per_chunk] for g in groups for i in range(0, len(g), per_chunk)]
        for chunk in tqdm(
            chunks, desc=f"patching {spec.name}", disable=not progress or len(chunks) < 2, leave=False
        ):
            logits = self._patched_logits(spec, [cells[i] for i in chunk], direction, full, neuron_positions)
            raw[chunk] = self.metric_values(metric, logits, full).cpu()
        return self._result(spec, metric, direction, normalize, "exact", cells, raw)

    def _prefetch(self, spec: Component, cells: list[Cell], neuron_positions=None) -> None:
        """Cache everything a sweep reads from both runs in one forward each (not one per first use)."""
        layers = sorted({c[0] for c in cells})
        names = [f"blocks.{layer}.{spec.hook}" for layer in layers]
        names += [f"blocks.{layer}.hook_resid_pre" for layer in layers]
        if ("pos" in spec.axes or neuron_positions is not None) and self.mask is None:
            names += [
                f"blocks.{layer}.attn.{h}"
                for layer in range(layers[0], self.model.cfg.n_layers)
                for h in ("hook_rot_k", "hook_v")
            ]
        for run in ("clean", "corrupted"):
            self._ensure(run, list(dict.fromkeys(names)))

    def _differs(self, spec: Component, cell: Cell, neuron_positions) -> bool:
        """Whether patching this cell changes anything (where both runs agree, patched run = base run)."""
        name = f"blocks.{cell[0]}.{spec.hook}"
        clean, corrupted = (
            self.activations("clean", [name])[name],
            self.activations("corrupted", [name])[name],
        )
        where = (slice(None), *cell_index(spec, cell, neuron_positions))
        return not torch.equal(clean[where], corrupted[where])

    def _check_cells(self, spec: Component, cells: list[Cell]) -> None:
        if not cells:
            raise ValueError("No cells to patch: pass at least one cell, or cells=None for the whole sweep.")
        valid = set(self.cells(spec.name, layer=cells[0][0] if spec.name == "neurons" and cells else None))
        for cell in cells:
            if cell not in valid:
                raise IndexError(
                    f"Cell {cell} is not a {spec.name} cell: its axes are {('layer', *spec.axes)}."
                )

    def _result(self, spec, metric, direction, normalize, method, cells, raw) -> PatchResult:
        clean, corrupted = self.baseline(metric, "clean"), self.baseline(metric, "corrupted")
        if normalize and abs(clean - corrupted) < 1e-9 * max(1.0, abs(clean)):
            raise ValueError(
                f"The clean and corrupted runs score the same ({clean:.6g}) on this metric, so nothing "
                "can be normalised: choose prompts whose behaviour differs, or pass normalize=False."
            )
        cfg = self.model.cfg
        sizes = {
            "layer": cfg.n_layers,
            "pos": self.n_pos,
            "head": cfg.n_heads,
            "kv_head": cfg.n_key_value_heads,
            "neuron": cfg.d_mlp,
        }
        return PatchResult(
            component=spec.name,
            metric=metric if isinstance(metric, str) else getattr(metric, "__name__", "metric"),
            direction=direction,
            method=method,
            normalized=normalize,
            axes=("layer", *spec.axes),
            cells=list(cells),
            raw=raw.double(),
            clean_value=clean,
            corrupted_value=corrupted,
            str_tokens=self.str_tokens,
            sizes=sizes,
            kv_groups=cfg.n_heads // cfg.n_key_value_heads,
            experiment=self,
        )

    # --------------------------------------------------------------------------------- one batched pass
    def _patched_logits(self, spec, chunk, direction, full, neuron_positions=None) -> torch.Tensor:
        """Logits of every variant in `chunk` (variant-major rows): last-token [rows, vocab] unless full."""
        base, source = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
        order = sorted(range(len(chunk)), key=lambda i: chunk[i][0])
        cells = [chunk[i] for i in order]
        start = self._suffix_start(spec, cells, neuron_positions)
        if start and spec.name == "neurons":
            neuron_positions = [p - start for p in neuron_positions]
        elif start:
            cells = [shift_cell(spec, c, start) for c in cells]
        joins = Counter(c[0] for c in cells)  # variants entering the batch at each layer, in layer order
        first = min(joins)
        names = {layer: f"blocks.{layer}.{spec.hook}" for layer in joins}
        sources = self.activations(source, list(names.values()))
        hooks, present = [], 0
        for layer in sorted(joins):
            src = sources[names[layer]]
            src = src[:, start:] if start else src
            present += joins[layer]
            mask = torch.zeros((present, *src.shape[1:]), dtype=torch.bool, device=src.device)
            for i in range(present - joins[layer], present):
                mask[i][cell_index(spec, cells[i], neuron_positions)] = True
            hooks.append((names[layer], patch_hook(src, mask[:, None])))
        entry = self.activations(base, [f"blocks.{layer}.hook_resid_pre" for layer in joins])
        entry = {layer: entry[f"blocks.{layer}.hook_resid_pre"][:, start:] for layer in joins}
        prefix = None
        if start:  # every layer from the first reads the base run's keys and values before `start`
            layers = range(first, self.model.cfg.n_layers)
            kv = self.activations(base, [act_name(h, la) for la in layers for h in ("rot_k", "v")])
            keys = {la: kv[act_name("rot_k", la)] for la in layers}
            values = {la: kv[act_name("v", la)] for la in layers}
            prefix = PrefixKV(keys, values, start)
        last = None if full else self.last - start
        with torch.no_grad():
            logits = forward_from(self.model, joins, entry, self.mask, hooks, last, prefix)
        logits = logits.view(len(cells), self.n_prompts, *logits.shape[1:])
        unsorted = torch.empty_like(logits)
        unsorted[order] = logits
        return unsorted.flatten(0, 1)

    def _suffix_start(self, spec: Component, cells: list[Cell], neuron_positions=None) -> int:
        """The first position any cell patches, where a position-indexed sweep can start (0 otherwise).

        Causal attention: positions before the patched one hold the base run's values in every layer, so
        only later positions are recomputed, attending to the base run's cached keys and values. Padded
        batches (whose prompts end at different positions) always run whole. Neurons patched at chosen
        positions start at the first of them.
        """
        if self.mask is not None:
            return 0
        if spec.name == "neurons" and neuron_positions is not None:
            return min(neuron_positions)
        if "pos" not in spec.axes:
            return 0
        return min(c[1 + spec.axes.index("pos")] for c in cells)

    def _neuron_positions(self, spec: Component, positions) -> list[int] | None:
        """Where a neuron sweep patches each neuron (checked, non-negative); None: every position."""
        if spec.name != "neurons" or positions is None:
            return None
        return sorted({self._check_pos(p) for p in positions})

    def patched_logits(
        self, component: str, cell: Cell, *, direction: str = "denoise", neuron_positions=None
    ):
        """Last-token logits [prompt, vocab] of the run with one cell patched."""
        spec = component_spec(component)
        cell = tuple(int(i) for i in cell)
        self._check_cells(spec, [cell])
        neuron_positions = self._neuron_positions(spec, neuron_positions)
        self._prefetch(spec, [cell], neuron_positions)
        return self._patched_logits(spec, [cell], check_direction(direction), False, neuron_positions)

    def predictions(
        self, component: str, cell: Cell, *, direction: str = "denoise", k: int = 5, prompt: int = 0
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
            probs = logits.float().softmax(-1)
            top = probs.topk(k)
            frame[name] = str_tokens(self.model, top.indices)
            frame[f"{name} p"] = top.values.tolist()
        return frame.set_index("rank")

    # ------------------------------------------------------------------------------------- attribution
    def attribute(
        self,
        components: str | Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "heads"),
        metric: Metric = "logit_diff",
        *,
        direction: str = "denoise",
        normalize: bool = True,
        layer: int | None = None,
    ) -> PatchResult | dict[str, PatchResult]:
        """Attribution patching: every cell of every component from one forward and backward of the base run.

        A cell's estimate is metric(base) + sum over the cell of (source - base) * d metric / d activation,
        the first-order Taylor expansion of exact patching; same result format (method="attribution").
        components: one name (one result), several (a dict by name), or "all" (every component; the
        neurons of `layer` only when a layer is given). The estimate is first-order: with "kl" and
        direction="noise" it is zero everywhere (KL to the clean run has zero gradient at the clean run).
        """
        if components == "all":
            components = [c for c in COMPONENTS if c != "neurons" or layer is not None]
        single = isinstance(components, str)
        specs = [component_spec(c) for c in ([components] if single else components)]
        metric, direction = self._check_metric(metric), check_direction(direction)
        base, source = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
        cells = {s.name: self.cells(s.name, layer=layer) for s in specs}
        names = sorted({f"blocks.{c[0]}.{s.hook}" for s in specs for c in cells[s.name]})
        sources = self.activations(source, names)
        acts, grads = {}, {}

        def capture(act, hook):
            acts[hook.name] = act.detach()
            act.register_hook(lambda g, name=hook.name: grads.__setitem__(name, g.detach()))

        def leaf(act, hook):  # the weights are frozen: the graph starts at the embeddings
            return act.detach().requires_grad_(True)

        hooks = [("hook_embed", leaf)] + [(n, capture) for n in names]
        full = callable(metric)
        with torch.enable_grad():
            last = None if full else self.last
            logits = forward_with_hooks(self.model, self.tokens(base), self.mask, hooks, last)
            self.metric_values(metric, logits, full).sum().backward()
        results = {}
        m_base = self.baseline(metric, base)
        for spec in specs:
            products = {}
            for name in {f"blocks.{c[0]}.{spec.hook}" for c in cells[spec.name]}:
                products[name] = ((sources[name] - acts[name]).double() * grads[name].double()).sum(0)
            raw = torch.tensor(
                [
                    m_base + products[f"blocks.{c[0]}.{spec.hook}"][cell_index(spec, c, None)].sum().item()
                    for c in cells[spec.name]
                ],
                dtype=torch.float64,
            )
            results[spec.name] = self._result(
                spec, metric, direction, normalize, "attribution", cells[spec.name], raw
            )
        return results[specs[0].name] if single else results


def _check_size(what: str, value: Any, unit: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"{what}={value!r}: give a whole number of {unit}, at least 1, or None for the default."
        )


def _metric_value(value: Any) -> torch.Tensor:
    """A custom metric's return value as float64, refused when it is not a finite number (or numbers)."""
    if (
        isinstance(value, str)
        or not isinstance(value, (int, float, torch.Tensor))
        and not hasattr(value, "__array__")
    ):
        raise TypeError(
            f"The metric returned {type(value).__name__} {value!r:.60}: return a number or a tensor (a "
            "scalar or one value per prompt) computed from the logits."
        )
    value = torch.as_tensor(value, dtype=torch.float64)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(
            f"The metric returned {value.tolist()}: not a finite number, so no patching effect can be "
            "measured. Check it on the unpatched logits (e.g. a log of 0, a division by a zero difference)."
        )
    return value
