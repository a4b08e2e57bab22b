"""Interventions: steering vectors and ablations as small objects that make hooks.

Every intervention has `hooks(model) -> [(hook name, fn)]`, so any run that takes hooks takes it:
`model.run_with_hooks(x, fwd_hooks=iv.hooks(model))`, `model.generate(x, fwd_hooks=iv.hooks(model))`, or
`with iv.applied(model): ...` around anything (a patching experiment included: see README). Interventions
combine with `+` (or `Interventions([a, b, ...])`) and describe themselves in their `repr`.

* `Steer(vector, layers, alpha, positions)`: adds `alpha * vector` to the residual stream entering each layer
  (`blocks.{l}.hook_resid_pre`) at all positions, the prompt's only, or generated ones only (read from
  `workbench.generation.current_step()`; outside a generation every position is prompt).
* `contrastive_vector(model, positives, negatives, layer)`: the mean difference of the residual stream
  between prompt pairs (activation addition / contrastive activation addition); `probe_vector(probe, layer,
  label)`: a probe's direction for one label. Both return a `SteeringVector` that reports its norm next to the
  stream's typical norm at that layer, so a coefficient reads as a fraction of the stream.
* `Ablate`: zero, mean (over a reference set) or resample ablation of heads (`attn.hook_z`), xIELU neurons
  (`mlp.hook_post`) or a whole layer's attention or MLP output (`hook_attn_out`, `hook_mlp_out`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from workbench.generation import current_step
from workbench.inputs import last_token_index
from workbench.names import act_name

Hook = tuple[str, Callable]
Positions = Literal["all", "prompt", "generated", "last"]


class Intervention:
    """Base: something that makes forward hooks for a model."""

    def hooks(self, model: Any) -> list[Hook]:
        raise NotImplementedError

    def __add__(self, other: Intervention) -> Interventions:
        return Interventions([self, other])

    @contextmanager
    def applied(self, model: Any) -> Iterator[Any]:
        """Attach the hooks for the block (nests with other `applied`/`model.hooks` blocks)."""
        with model.hooks(fwd_hooks=self.hooks(model)):
            yield model


class Interventions(Intervention):
    """Several interventions applied together, in order."""

    def __init__(self, parts: Sequence[Intervention]) -> None:
        self.parts: list[Intervention] = []
        for part in parts:
            if not isinstance(part, Intervention):
                raise TypeError(f"{part!r} is not an intervention (Steer, Ablate or a sum of them).")
            self.parts.extend(part.parts if isinstance(part, Interventions) else [part])

    def hooks(self, model: Any) -> list[Hook]:
        return [hook for part in self.parts for hook in part.hooks(model)]

    def __repr__(self) -> str:
        return " + ".join(repr(p) for p in self.parts) or "Interventions([])"


# ----------------------------------------------------------------------------------------------- steering
@dataclass
class SteeringVector:
    """A direction in the residual stream entering `layer`, with what it was built from.

    `norm`: its L2 norm; `stream_norm`: the mean L2 norm of the residual stream at that layer over the
    prompts that built it (None for probe directions), so `alpha * norm / stream_norm` is the size of a
    steer relative to the stream.
    """

    vector: torch.Tensor  # [d_model]
    layer: int
    source: str
    stream_norm: float | None = None

    @property
    def norm(self) -> float:
        return float(self.vector.float().norm())

    def __repr__(self) -> str:
        stream = "" if self.stream_norm is None else f", stream norm {self.stream_norm:.3g}"
        return f"SteeringVector(layer {self.layer}, norm {self.norm:.3g}{stream}, from {self.source})"

    def steer(self, alpha: float = 1.0, positions: Positions | Sequence[int] = "all") -> Steer:
        return Steer(self, alpha=alpha, positions=positions)


class Steer(Intervention):
    """Add `alpha * vector` to `blocks.{l}.hook_resid_pre` for each of `layers` at `positions`.

    positions: "all", "prompt" (columns of the prompt), "generated" (only new tokens of a generation), "last"
    (the last position of each forward: where the next token is read), or
    explicit column indices. `vector` is a tensor [d_model] or a `SteeringVector` (whose layer is the
    default).
    """

    def __init__(
        self,
        vector: torch.Tensor | SteeringVector,
        layers: int | Sequence[int] | None = None,
        alpha: float = 1.0,
        positions: Positions | Sequence[int] = "all",
    ) -> None:
        if isinstance(vector, SteeringVector):
            layers = vector.layer if layers is None else layers
            vector = vector.vector
        if layers is None:
            raise ValueError("Steer needs the layers to steer at (layers=...), or a SteeringVector.")
        if not isinstance(vector, torch.Tensor) or vector.ndim != 1:
            raise ValueError("The steering vector is one direction [d_model]: a 1-dimensional tensor.")
        if isinstance(positions, str) and positions not in ("all", "prompt", "generated", "last"):
            raise ValueError(
                f"positions must be 'all', 'prompt', 'generated' or column indices: {positions!r}."
            )
        self.vector, self.alpha, self.positions = vector, float(alpha), positions
        self.layers = [layers] if isinstance(layers, int) else list(layers)

    def __repr__(self) -> str:
        where = self.positions if isinstance(self.positions, str) else f"columns {list(self.positions)}"
        return (
            f"Steer({self.alpha:g} x vector of norm {float(self.vector.float().norm()):.3g} "
            f"at resid_pre {self.layers}, {where} positions)"
        )

    def hooks(self, model: Any) -> list[Hook]:
        if self.vector.shape[0] != model.cfg.d_model:
            raise ValueError(
                f"The vector has {self.vector.shape[0]} entries; this model's d_model is {model.cfg.d_model}."
            )
        for layer in self.layers:
            model.check_layer(layer)
        return [(act_name("resid_pre", layer), self._add) for layer in self.layers]

    def _add(self, resid: torch.Tensor, hook: Any) -> torch.Tensor:
        delta = (self.alpha * self.vector.to(resid.device, torch.float32)).to(resid.dtype)
        where = self._where(resid.shape[1], resid.device)
        if where is None:
            return resid + delta
        return resid + delta * where[:, None].to(resid.dtype)

    def _where(self, n: int, device: torch.device) -> torch.Tensor | None:
        """[pos] 0/1 of the activation's positions to steer (None: all)."""
        step = current_step()
        columns = torch.arange(n, device=device) if step is None else step.positions.to(device)
        if self.positions == "all":
            return None
        if self.positions == "prompt":
            return columns < (n if step is None else step.prompt_length)
        if (
            self.positions == "last"
        ):  # the position whose next token is read: the prompt's last, then each new one
            return columns == columns[-1]
        if self.positions == "generated":
            return columns >= (n if step is None else step.prompt_length)
        wanted = torch.tensor(list(self.positions), device=device)
        return torch.isin(columns, wanted)


def _last_and_mean(model: Any, texts: Sequence[str], layer: int, at: str | int):
    """Residual stream entering `layer` per prompt: at its last token, the mean over its tokens, or a
    column index (texts padded on the left so the last token is the last column)."""
    name = act_name("resid_pre", layer)
    tokens, mask = model.tokenize(list(texts), padding_side="left")
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=name)
    resid, real = cache[name].float(), mask.to(cache[name].device).bool()
    norms = resid.norm(dim=-1)[real].mean()
    if at == "last":
        return resid[torch.arange(len(resid), device=resid.device), last_token_index(real)], norms
    if at == "mean":
        return (resid * real[..., None]).sum(1) / real.sum(1, keepdim=True), norms
    if isinstance(at, int):
        return resid[:, at], norms
    raise ValueError(f"at must be 'last', 'mean' or a column index, not {at!r}.")


def contrastive_vector(
    model: Any, positives: Sequence[str], negatives: Sequence[str], layer: int, *, at: str | int = "last"
) -> SteeringVector:
    """Mean over pairs of (positive - negative) residual stream entering `layer` (activation addition).

    at: "last" (each prompt's last token), "mean" (mean over its tokens) or a column index (prompts of equal
    length, e.g. the position where a name was swapped).
    """
    if isinstance(positives, str) or isinstance(negatives, str):
        raise TypeError("positives and negatives are lists of prompts (one pair per index).")
    if len(positives) != len(negatives) or not positives:
        raise ValueError(
            f"Need as many positive as negative prompts (>= 1): {len(positives)} vs {len(negatives)}."
        )
    model.check_layer(layer)
    pos, pos_norm = _last_and_mean(model, positives, layer, at)
    neg, neg_norm = _last_and_mean(model, negatives, layer, at)
    vector = (pos - neg).mean(0).to(model.cfg.dtype)
    source = f"{len(positives)} contrastive pairs at {at}"
    return SteeringVector(vector, layer, source, float((pos_norm + neg_norm) / 2))


def probe_vector(probe: Any, layer: int | str, label: str, *, unit: bool = True) -> SteeringVector:
    """The direction a `workbench.probing.ProbeResult` probe reads for `label` at `layer`: the label's weight
    column minus the mean of the other labels' (what raises that label's logit against the rest), as a unit
    vector unless `unit=False`. Only probes of a residual stream (`resid_pre`/`resid_post`) can steer it; a
    probe on RMS-normalised features (`probe.normalize`) points the same way in the raw stream."""
    index = probe.index(layer)
    hook = probe.hooks[index]
    if "resid_pre" not in hook and "resid_post" not in hook:
        raise ValueError(f"The probe at {layer!r} reads {hook}; steering needs a residual-stream probe.")
    if label not in probe.label_names:
        raise ValueError(f"Unknown label {label!r}: the probe's labels are {probe.label_names}.")
    weight = probe.weight[index, : probe.widths[index]].float()  # [width, classes]
    c = probe.label_names.index(label)
    others = [i for i in range(weight.shape[1]) if i != c]
    vector = weight[:, c] - weight[:, others].mean(1)
    if unit:
        vector = vector / vector.norm()
    # resid_post of layer l is resid_pre of layer l + 1: steer where the probe reads.
    number = int(hook.split(".")[1])
    stream = number + 1 if "resid_post" in hook else number
    return SteeringVector(vector, stream, f"probe {label!r} at {hook}")


# ----------------------------------------------------------------------------------------------- ablation
ABLATABLE = {"heads": "z", "neurons": "post", "attn": "attn_out", "mlp": "mlp_out"}


class Ablate(Intervention):
    """Ablate heads, xIELU neurons or a whole attention / MLP output of one layer.

    what: "heads" (indices of query heads, on `attn.hook_z`), "neurons" (indices into d_mlp, on
    `mlp.hook_post`), "attn" or "mlp" (the layer's whole output, `hook_attn_out`/`hook_mlp_out`).
    mode: "zero"; "mean" (the mean activation over the real tokens of `reference`, prompts or token ids);
    "resample" (the activation at the same column of a reference prompt drawn at random with `seed`; the
    reference prompts must be at least as long as the input).
    """

    def __init__(
        self,
        what: Literal["heads", "neurons", "attn", "mlp"],
        layer: int,
        index: int | Sequence[int] | None = None,
        mode: Literal["zero", "mean", "resample"] = "zero",
        reference: Any = None,
        seed: int = 0,
    ) -> None:
        if what not in ABLATABLE:
            raise ValueError(f"what must be one of {list(ABLATABLE)}, not {what!r}.")
        if mode not in ("zero", "mean", "resample"):
            raise ValueError(f"mode must be 'zero', 'mean' or 'resample', not {mode!r}.")
        if mode != "zero" and reference is None:
            raise ValueError(f"{mode} ablation needs reference= prompts to take activations from.")
        if what in ("heads", "neurons") and index is None:
            raise ValueError(f"Name the {what} to ablate: index=[...].")
        self.what, self.layer, self.mode, self.reference, self.seed = what, layer, mode, reference, seed
        self.index = None if index is None else [index] if isinstance(index, int) else list(index)
        self._stats: dict[int, torch.Tensor] = {}

    def __repr__(self) -> str:
        part = {"heads": "head", "neurons": "neuron"}.get(self.what)
        items = f" {part}s {self.index}" if part else f" {self.what} output"
        return f"Ablate({self.mode}: layer {self.layer}{items})"

    @property
    def hook_name(self) -> str:
        return act_name(ABLATABLE[self.what], self.layer)

    def hooks(self, model: Any) -> list[Hook]:
        model.check_layer(self.layer)
        for i in self.index or []:
            if self.what == "heads":
                model.check_head(i)
            elif not 0 <= i < model.cfg.d_mlp:
                raise IndexError(f"Neuron {i} is out of range: choose in 0..{model.cfg.d_mlp - 1}.")
        source = None if self.mode == "zero" else self._reference(model)
        return [(self.hook_name, lambda act, hook: self._ablate(act, source))]

    def _reference(self, model: Any) -> torch.Tensor:
        """The mean [..] or the per-column activations [n_ref, pos, ..] of the reference set (kept)."""
        key = id(model)
        if key not in self._stats:
            ref = self.reference
            tokens, mask = model.tokenize(ref) if isinstance(ref, (str, list)) else (ref, None)
            _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=self.hook_name)
            acts = cache[self.hook_name]
            if self.mode == "mean":
                real = torch.ones(acts.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
                acts = acts[real.to(acts.device)].mean(0)
            self._stats[key] = acts
        return self._stats[key]

    def _ablate(self, act: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        act = act.clone()
        index = slice(None) if self.index is None else self.index
        if self.mode == "zero":
            act[:, :, index] = 0
        elif self.mode == "mean":
            act[:, :, index] = source[index].to(act.dtype)
        else:
            act[:, :, index] = self._resampled(act, source)[:, :, index]
        return act

    def _resampled(self, act: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        step = current_step()
        columns = torch.arange(act.shape[1]) if step is None else step.positions.cpu()
        if int(columns.max()) >= source.shape[1]:
            raise ValueError(
                f"Resample ablation reads column {int(columns.max())} but the reference prompts have "
                f"{source.shape[1]} tokens: pass longer reference prompts."
            )
        gen = torch.Generator().manual_seed(self.seed)
        rows = torch.randint(source.shape[0], (act.shape[0],), generator=gen)
        return source[rows][:, columns.to(source.device)].to(act.device, act.dtype)


def ablate_heads(layer: int, heads: int | Sequence[int], mode="zero", reference=None, seed=0) -> Ablate:
    return Ablate("heads", layer, heads, mode, reference, seed)


def ablate_neurons(layer: int, neurons: int | Sequence[int], mode="zero", reference=None, seed=0) -> Ablate:
    return Ablate("neurons", layer, neurons, mode, reference, seed)


def ablate_attention(layer: int, mode="zero", reference=None, seed=0) -> Ablate:
    return Ablate("attn", layer, None, mode, reference, seed)


def ablate_mlp(layer: int, mode="zero", reference=None, seed=0) -> Ablate:
    return Ablate("mlp", layer, None, mode, reference, seed)


def induction_accuracy(
    model: Any, tokens: torch.Tensor, length: int, intervention: Intervention | None = None
) -> float:
    """Top-1 accuracy of the hooked model on the predictable tokens of later copies of repeated sequences
    (`workbench.data.corpus.repeated_token_ids`), under `intervention`: the positions and rule of
    `workbench.checkpoint.evaluate.induction_accuracy`, which runs a plain transformers model."""
    prefix = tokens.shape[1] % length
    positions = [p for p in range(prefix + length, tokens.shape[1] - 1) if (p + 1 - prefix) % length != 0]
    pos = torch.tensor(positions)
    hooks = [] if intervention is None else intervention.hooks(model)
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    predicted = logits[:, pos].argmax(-1).cpu()
    return float((predicted == tokens[:, pos + 1]).float().mean())
