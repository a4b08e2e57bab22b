"""The xIELU activation of Apertus's MLP: its learned curve, its regimes, and how a dataset falls into them.

Apertus's MLP has no gate: `down_proj(xIELU(up_proj(x)))`, with per-layer learned scalars (see
`HookedApertus.xielu_parameters()`):

    xIELU(x) = alpha_p x^2 + beta x                              for x > 0
    xIELU(x) = alpha_n (expm1(min(x, eps)) - x) + beta x          for x <= 0

Because alpha_n = beta + softplus(.) > beta, the negative branch's slope tends to beta - alpha_n < 0 as
x -> -inf: far enough out, a more negative input gives a *larger* output. When beta > 0 the branch first
falls from 0 to a minimum at x* = log(1 - beta / alpha_n) (where alpha_n (e^x - 1) + beta = 0) and only
then rises. The three regimes of an input x are therefore

    positive          x > 0                (the quadratic branch)
    negative falling  x* < x <= 0          (output falls as x goes down: an ordinary activation)
    negative rising   x <= x*              (output rises again as x goes down: a neuron can answer to
                                            strongly negative pre-activations)

with the minimum itself the first point of "negative rising". When the branch has no minimum (beta <= 0,
or beta so small that x* lies inside the eps clamp) it rises all the way from 0: x* is taken as 0 and the
falling regime is empty. The clamp makes the branch linear with slope beta - alpha_n on (eps, 0], a sliver
of width |eps| (1e-6 by default) that is counted as "negative falling" even though its slope has the
other sign: its effect on the output is below |eps| * (alpha_n - beta).

`xielu_statistics` streams a dataset through the model once with bounded memory (fixed-size histograms,
counts and per-neuron top-k buffers) and returns an `XIELUStatistics` that answers the per-layer and
per-neuron questions as DataFrames; `xielu_figure` and `regime_share_figure` draw them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from workbench import executors, figures
from workbench.hooked_model import HookedApertus
from workbench.inputs import batches
from workbench.names import act_name

REGIMES: tuple[str, ...] = ("positive", "negative falling", "negative rising")
REGIME_COLORS: dict[str, str] = {
    "positive": "#2166ac",
    "negative falling": "#f4a582",
    "negative rising": "#b2182b",
}
_POSITIVE, _FALLING, _RISING = 0, 1, 2


# ------------------------------------------------------------------------------------------- the curve
def xielu(x: torch.Tensor, alpha_p: float, alpha_n: float, beta: float, eps: float) -> torch.Tensor:
    """xIELU with the *effective* scalars (as `xielu_parameters()` reports them), elementwise on `x`."""
    x = torch.as_tensor(x)
    negative = alpha_n * (torch.expm1(torch.clamp(x, max=eps)) - x) + beta * x
    return torch.where(x > 0, alpha_p * x * x + beta * x, negative)


def negative_minimum(alpha_n: float, beta: float, eps: float) -> float | None:
    """The input x* < 0 at which the negative branch has its minimum, or None when it has none.

    Solves alpha_n (e^x - 1) + beta = 0 on the unclamped part x <= eps. A solution needs
    0 < beta < alpha_n; it is the minimum of the branch only if it lies left of the clamp (x* < eps), since
    on (eps, 0] the branch is linear and decreasing.
    """
    if not (0 < beta < alpha_n):
        return None
    x_star = math.log1p(-beta / alpha_n)
    return x_star if x_star < eps else None


def regime_boundary(alpha_n: float, beta: float, eps: float) -> float:
    """The boundary between "negative falling" and "negative rising": x*, or 0 when there is no minimum."""
    x_star = negative_minimum(alpha_n, beta, eps)
    return 0.0 if x_star is None else x_star


def classify_regimes(x: torch.Tensor, boundary: float | torch.Tensor) -> torch.Tensor:
    """Regime index per element (0 positive, 1 negative falling, 2 negative rising; see `REGIMES`).

    `boundary` is x* from `regime_boundary` (a float, or a tensor that broadcasts against `x`, e.g. one
    value per layer). Positive is x > 0, falling is boundary < x <= 0, rising is x <= boundary.
    """
    x = torch.as_tensor(x)
    boundary = torch.as_tensor(boundary, dtype=x.dtype, device=x.device)
    falling_or_rising = torch.where((x <= boundary) & (x <= 0), _RISING, _FALLING)
    return torch.where(x > 0, _POSITIVE, falling_or_rising).long()


def curve_table(model: HookedApertus) -> pd.DataFrame:
    """Per layer: the effective xIELU scalars, the minimum x* of the negative branch and its value there.

    `x_min`/`y_min` are NaN for a layer whose negative branch has no minimum; `boundary` is the
    falling/rising boundary used for the regimes (x*, or 0 without a minimum).
    """
    table = model.xielu_parameters().copy()
    x_min, y_min, bound = [], [], []
    for row in table.itertuples():
        x_star = negative_minimum(row.alpha_n, row.beta, row.eps)
        x_min.append(np.nan if x_star is None else x_star)
        y = (
            np.nan
            if x_star is None
            else float(xielu(torch.tensor(x_star), row.alpha_p, row.alpha_n, row.beta, row.eps))
        )
        y_min.append(y)
        bound.append(regime_boundary(row.alpha_n, row.beta, row.eps))
    table["x_min"], table["y_min"], table["boundary"] = x_min, y_min, bound
    return table


def layer_curve(model: HookedApertus, layer: int, x: torch.Tensor | None = None) -> pd.DataFrame:
    """The learned curve of one layer on a grid (default: -12..4), with each point's regime."""
    model.check_layer(layer)
    p = curve_table(model).loc[layer]
    x = (
        torch.linspace(-12, 4, 801, dtype=torch.float64)
        if x is None
        else torch.as_tensor(x, dtype=torch.float64)
    )
    y = xielu(x, p.alpha_p, p.alpha_n, p.beta, p.eps)
    regime = classify_regimes(x, p.boundary)
    return pd.DataFrame({"x": x.numpy(), "y": y.numpy(), "regime": [REGIMES[i] for i in regime.tolist()]})


# -------------------------------------------------------------------------------- per-neuron directions
def neuron_output_tokens(model: HookedApertus, layer: int, neuron: int, k: int = 10) -> pd.DataFrame:
    """The tokens a neuron's output direction promotes and suppresses, read through the unembedding.

    The direction is column `neuron` of down_proj (what one unit of post-activation adds to the residual
    stream), times the final norm's weight (as the model applies it) and W_U. The final norm's scale is a
    positive number per token, so it does not change the ranking. A negative post-activation (the
    negative branch) flips the roles of the two lists.
    """
    model.check_layer(layer)
    _check_neuron(model, neuron)
    w_down = model.hf_model.model.layers[layer].mlp.down_proj.weight[:, neuron]
    norm_weight = model.hf_model.model.norm.weight
    scores = direction_scores(model, w_down * norm_weight.to(w_down.device))
    k = min(k, scores.numel())
    rows = []
    for kind, (values, ids) in (("promoted", scores.topk(k)), ("suppressed", (-scores).topk(k))):
        for rank, (value, token) in enumerate(zip(values.tolist(), ids.tolist())):
            logit = value if kind == "promoted" else -value
            rows.append(
                {
                    "kind": kind,
                    "rank": rank,
                    "token": model.token_labels([token])[0],
                    "token_id": token,
                    "logit": logit,
                }
            )
    return pd.DataFrame(rows)


def direction_scores(model: HookedApertus, direction: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """`direction @ W_U` in float32 [d_vocab] on the CPU, reading the unembedding `chunk` tokens at a time so
    that no float32 copy of the whole matrix is made (131k x 4096 would be 2 GB)."""
    w_u = model.W_U
    direction = direction.to(device=w_u.device, dtype=torch.float32)
    return torch.cat(
        [(direction @ w_u[:, start : start + chunk].float()).cpu() for start in range(0, w_u.shape[1], chunk)]
    )


def _check_neuron(model: HookedApertus, neuron: int) -> int:
    if not isinstance(neuron, int) or isinstance(neuron, bool) or not 0 <= neuron < model.cfg.d_mlp:
        raise IndexError(
            f"neuron {neuron!r} is out of range: each MLP has {model.cfg.d_mlp} neurons "
            f"(0..{model.cfg.d_mlp - 1})."
        )
    return neuron


# ------------------------------------------------------------------------------ streaming statistics
@dataclass
class XIELUStatistics:
    """What one pass of `xielu_statistics` gathered. Everything is a fixed-size array: memory does not grow
    with the dataset. Shapes: L layers, N neurons per layer, R = 3 regimes, B histogram bins, K top-k slots.
    """

    params: pd.DataFrame  # curve_table of the model
    layers: list[int]  # the layers gathered (the others' arrays stay empty)
    bin_edges: np.ndarray  # [L, B + 1] pre-activation histogram edges per layer
    hist: np.ndarray  # [L, B] counts of pre-activations; values outside the edges are in `outside`
    outside: np.ndarray  # [L, 2] counts below / above the edges
    counts: np.ndarray  # [L, N, R] activations of each neuron in each regime
    post_abs: np.ndarray  # [L, N, R] sum of |post-activation| of each neuron in each regime
    # [L, R] sum over tokens of ||down_proj(post masked to the regime)||: two regimes projected, the
    # positive one as the MLP output minus them (linearity)
    output_norm: np.ndarray
    top_values: np.ndarray  # [L, N, K] largest pre-activations, descending (NaN = empty slot)
    # [L, N, K, C] int32 token ids around each (-1 = none); the token is at `context_before`
    top_context: np.ndarray
    bottom_values: np.ndarray  # [L, N, K] most negative pre-activations, ascending
    bottom_context: np.ndarray  # [L, N, K, C]
    top_where: np.ndarray  # [L, N, K, 2] (prompt index, position)
    bottom_where: np.ndarray  # [L, N, K, 2]
    context_before: int
    n_tokens: int
    n_prompts: int
    token_text: list[str] = field(repr=False, default_factory=list)  # vocabulary id -> text

    # ----------------------------------------------------------------------------------- per layer
    def regime_shares(self) -> pd.DataFrame:
        """Share of all pre-activations (tokens x neurons) in each regime, per layer (rows sum to 1)."""
        counts = self.counts[self.layers].sum(1)
        return _by_layer(counts / np.maximum(counts.sum(1, keepdims=True), 1), self.layers)

    def output_shares(self) -> pd.DataFrame:
        """Per layer, each regime's share of the MLP output: the summed norm of down_proj applied to the
        post-activations of that regime alone, over the sum for the three regimes (rows sum to 1)."""
        norm = self.output_norm[self.layers]
        return _by_layer(
            norm / np.where(norm.sum(1, keepdims=True) > 0, norm.sum(1, keepdims=True), 1), self.layers
        )

    def histogram(self, layer: int) -> pd.DataFrame:
        """The pre-activation histogram of one layer: bin edges, counts, density and the regime of each bin
        (by its centre)."""
        edges = self.bin_edges[layer]
        centres = (edges[:-1] + edges[1:]) / 2
        regime = classify_regimes(torch.from_numpy(centres), float(self.params.loc[layer, "boundary"]))
        counts = self.hist[layer]
        density = counts / max(counts.sum(), 1) / np.diff(edges)
        return pd.DataFrame(
            {
                "left": edges[:-1],
                "right": edges[1:],
                "centre": centres,
                "count": counts,
                "density": density,
                "regime": [REGIMES[i] for i in regime.tolist()],
            }
        )

    # ---------------------------------------------------------------------------------- per neuron
    def neuron_regimes(self, layer: int, neuron: int) -> pd.DataFrame:
        """One neuron: per regime, how often it is there and its share of the neuron's output norm
        (|post| x ||W_down[:, n]||, so the share is that of sum |post|)."""
        counts = self.counts[layer, neuron]
        post = self.post_abs[layer, neuron]
        return pd.DataFrame(
            {
                "count": counts,
                "share_of_activations": counts / max(counts.sum(), 1),
                "share_of_output": post / post.sum() if post.sum() > 0 else np.zeros_like(post),
            },
            index=pd.Index(REGIMES, name="regime"),
        )

    def examples(self, layer: int, neuron: int, which: str = "top") -> pd.DataFrame:
        """The dataset examples where a neuron's pre-activation was largest (`which="top"`) or most negative
        (`"bottom"`): value, prompt index, position, the token and its context (a list of token texts with
        the example's token at `focus`)."""
        if which not in ("top", "bottom"):
            raise ValueError(f"which must be 'top' or 'bottom', not {which!r}.")
        values = (self.top_values if which == "top" else self.bottom_values)[layer, neuron]
        context = (self.top_context if which == "top" else self.bottom_context)[layer, neuron]
        where = (self.top_where if which == "top" else self.bottom_where)[layer, neuron]
        boundary = float(self.params.loc[layer, "boundary"])
        rows = []
        for value, ids, (prompt, pos) in zip(values, context, where):
            if np.isnan(value):
                continue
            kept = [i for i in ids.tolist() if i >= 0]
            focus = self.context_before - sum(1 for i in ids[: self.context_before].tolist() if i < 0)
            tokens = [self.token_text[i] for i in kept]
            regime = REGIMES[int(classify_regimes(torch.tensor(float(value)), boundary))]
            rows.append(
                {
                    "value": float(value),
                    "regime": regime,
                    "prompt": int(prompt),
                    "position": int(pos),
                    "token": tokens[focus],
                    "context": tokens,
                    "focus": focus,
                }
            )
        return pd.DataFrame(
            rows, columns=["value", "regime", "prompt", "position", "token", "context", "focus"]
        )


def _by_layer(values: np.ndarray, layers: list[int]) -> pd.DataFrame:
    return pd.DataFrame(values, columns=list(REGIMES), index=pd.Index(layers, name="layer"))


def xielu_statistics(
    model: HookedApertus,
    prompts: Iterable[str] | torch.Tensor,
    *,
    batch_size: int = 16,
    bins: int = 120,
    value_range: tuple[float, float] | None = None,
    top_k: int = 8,
    context_before: int = 8,
    context_after: int = 2,
    skip_bos: bool = True,
    layers: Sequence[int] | None = None,
    neuron_chunk: int = 2048,
    progress: bool = True,
    bin_edges: np.ndarray | None = None,
    executor: Any = None,
    shard_prompts: int | None = None,
) -> XIELUStatistics:
    """Stream `prompts` through the model once and gather xIELU statistics with bounded memory.

    prompts: texts (an iterable: it is read once, batch by batch) or a [n, pos] tensor of token ids.
    bins, value_range: the pre-activation histograms; without a range, each layer's range is set from
        the first batch (widened by half and to include x*); later values outside it are counted in
        `outside`.
    top_k, context_before, context_after: how many top/bottom examples to keep per neuron and how many
        tokens of context around each.
    skip_bos: leave out the first token of each prompt (BOS collects outsized activations).
    neuron_chunk: neurons folded at a time; what the statistics hold beyond the forward is about
        batch tokens x (neuron_chunk x 20 + d_model x 12) bytes, one layer at a time.

    bin_edges: fixed [n_layers, bins + 1] histogram edges (e.g. another pass's `bin_edges`), so that
        passes over parts of a dataset can be merged (`merge_statistics`).
    executor, shard_prompts: cut the prompts (a list or tensor) into shards of `shard_prompts` and run them
        on `executor` (None: in this process; a `workbench.executors.RayExecutor`: on Ray workers), merging
        the shards' statistics in shard order. The first shard fixes the histogram edges for all. The same
        shards give the same numbers bit for bit wherever they run (on the same kind of device).

    Each gathered layer is folded into the statistics by hooks as the forward passes it (no layer's
    activations outlive its hooks), and the forward stops after the last gathered layer.
    """
    if executor is not None or shard_prompts is not None:
        options = dict(
            batch_size=batch_size, bins=bins, value_range=value_range, top_k=top_k, layers=layers,
            context_before=context_before, context_after=context_after, skip_bos=skip_bos,
            neuron_chunk=neuron_chunk,
        )  # fmt: skip
        return _sharded_statistics(model, prompts, executor, shard_prompts, bin_edges, options, progress)
    checked = (("batch_size", batch_size), ("bins", bins), ("top_k", top_k), ("neuron_chunk", neuron_chunk))
    for name, value in checked:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}.")
    if value_range is not None and not value_range[0] < value_range[1]:
        raise ValueError(f"value_range must be (low, high) with low < high, not {value_range!r}.")
    layers = list(range(model.cfg.n_layers)) if layers is None else [model.check_layer(la) for la in layers]
    params = curve_table(model)
    acc = _Accumulator(
        model, layers, params, bins, value_range, top_k, context_before, context_after, neuron_chunk
    )
    if bin_edges is not None:
        acc.edges = np.array(bin_edges, dtype=np.float64)
    prompt_batches = _batches(prompts, batch_size)
    total = len(prompt_batches) if isinstance(prompt_batches, list) else None

    hooks = acc.hooks()
    stop = max(layers) + 1
    for batch in tqdm(prompt_batches, total=total, desc="xIELU statistics", disable=not progress):
        tokens, mask = _tokens_and_mask(model, batch)
        valid = mask.bool().clone() if mask is not None else torch.ones_like(tokens, dtype=torch.bool)
        if skip_bos:
            first = valid.long().argmax(1)  # the first real token of each row (left or right padding)
            valid[torch.arange(len(valid)), first] = False
        if not acc.start_batch(tokens.cpu(), valid.cpu()):
            continue
        with torch.no_grad():
            model.run_with_hooks(
                tokens,
                attention_mask=mask,
                fwd_hooks=hooks,
                stop_at_layer=stop if stop < model.cfg.n_layers else None,
                return_type=None,
            )
    return acc.result(model)


def _sharded_statistics(model, prompts, executor, shard_prompts, bin_edges, options, progress):
    if not isinstance(prompts, (list, tuple, torch.Tensor)):
        raise TypeError("Sharded statistics need the prompts as a list of texts or a tensor of token ids.")
    size = shard_prompts or max(len(prompts) // 8, options["batch_size"])
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"shard_prompts must be a positive integer, not {shard_prompts!r}.")
    shards = [(rows.start, rows.stop) for rows in batches(range(len(prompts)), size)]
    executor = executors.resolve(executor)
    bar = tqdm(total=len(shards), desc="xIELU statistics (shards)", unit="shard", disable=not progress)
    parts = {}
    job = partial(statistics_shard, prompts=prompts, options=options, bin_edges=bin_edges)
    for shard, part, _ in executor.map(model, job, shards[:1]):  # the first shard fixes the edges
        parts[shard] = part
        bar.update()
    job = partial(statistics_shard, prompts=prompts, options=options, bin_edges=parts[shards[0]].bin_edges)
    for shard, part, _ in executor.map(model, job, shards[1:]):
        parts[shard] = part
        bar.update()
    bar.close()
    return merge_statistics([parts[shard] for shard in shards])


def statistics_shard(
    model, shard: tuple[int, int], progress, *, prompts, options, bin_edges
) -> XIELUStatistics:
    """The statistics of prompts[start:stop]: the job an executor runs for one shard."""
    part = prompts[shard[0] : shard[1]]
    return xielu_statistics(model, part, **options, bin_edges=bin_edges, progress=False)


def merge_statistics(parts: Sequence[XIELUStatistics]) -> XIELUStatistics:
    """One `XIELUStatistics` from passes over consecutive parts of a dataset (same model, options and
    histogram edges), as if gathered in one pass: counts and sums add, top-k lists merge, prompt indices
    continue from part to part. Merging in the same order gives the same numbers bit for bit."""
    first = parts[0]
    for part in parts[1:]:
        if part.layers != first.layers or not np.array_equal(part.bin_edges, first.bin_edges, equal_nan=True):
            raise ValueError(
                "These statistics differ in layers or histogram edges: merge only passes run with the same "
                "options and bin_edges (xielu_statistics(..., bin_edges=first.bin_edges))."
            )
    merged = {name: sum(getattr(p, name) for p in parts) for name in _ADDED}
    offsets = np.cumsum([0] + [p.n_prompts for p in parts[:-1]])
    for side, largest in (("top", True), ("bottom", False)):
        values = np.concatenate([getattr(p, f"{side}_values") for p in parts], axis=2)
        context = np.concatenate([getattr(p, f"{side}_context") for p in parts], axis=2)
        where = np.concatenate(
            [_shift_prompts(getattr(p, f"{side}_where"), off) for p, off in zip(parts, offsets)], axis=2
        )
        fill = -np.inf if largest else np.inf
        key = np.where(np.isnan(values), fill, values)
        order = np.argsort(-key if largest else key, axis=2, kind="stable")[..., : first.top_values.shape[2]]
        merged[f"{side}_values"] = np.take_along_axis(values, order, 2)
        merged[f"{side}_context"] = np.take_along_axis(context, order[..., None], 2)
        merged[f"{side}_where"] = np.take_along_axis(where, order[..., None], 2)
    return replace(first, **merged)


_ADDED = ("hist", "outside", "counts", "post_abs", "output_norm", "n_tokens", "n_prompts")


def _shift_prompts(where: np.ndarray, offset: int) -> np.ndarray:
    shifted = where.copy()
    shifted[..., 0] = np.where(where[..., 0] >= 0, where[..., 0] + offset, -1)
    return shifted


def _batches(prompts, batch_size: int):
    """A list of batches (`workbench.inputs.batches`), or a stream of them for an iterator of texts that has
    no length (read as the statistics go, never held whole)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.ndim != 2 or prompts.dtype.is_floating_point:
            raise ValueError(
                f"Token ids must be an integer tensor [n, pos]; got {prompts.dtype} {tuple(prompts.shape)}."
            )
        return batches(prompts, batch_size)
    if isinstance(prompts, str):
        raise TypeError("prompts is a single str: pass a list of texts (e.g. [text]).")
    if hasattr(prompts, "__len__"):
        return batches(list(prompts), batch_size)
    return _streamed_batches(prompts, batch_size)


def _streamed_batches(prompts, batch_size: int):
    batch: list[str] = []
    for text in prompts:
        batch.append(text)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokens_and_mask(model: HookedApertus, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    tokens, mask = model.tokenize(batch)
    return tokens, mask


class _Accumulator:
    """Fixed-size running statistics, folded in layer by layer while the forward passes.

    `hooks()` gives three hooks per gathered layer: hook_pre keeps a reference to the layer's pre-activations,
    hook_post folds the layer into the statistics (neuron chunk by neuron chunk, so no float32 copy of a
    whole layer exists) and hook_mlp_out completes the output norms and drops the layer. At most one layer's
    activations are alive beyond what the forward itself holds.
    """

    def __init__(self, model, layers, params, bins, value_range, top_k, before, after, chunk):
        n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
        self.model, self.layers, self.params, self.bins = model, layers, params, bins
        self.value_range, self.k, self.chunk = value_range, top_k, chunk
        self.before, self.after = before, after
        width = before + 1 + after
        self.edges = np.full((n_layers, bins + 1), np.nan)
        self.hist = np.zeros((n_layers, bins), dtype=np.int64)
        self.outside = np.zeros((n_layers, 2), dtype=np.int64)
        self.counts = np.zeros((n_layers, d_mlp, 3), dtype=np.int64)
        self.post_abs = np.zeros((n_layers, d_mlp, 3))
        self.output_norm = np.zeros((n_layers, 3))
        self.top = _TopK(n_layers, d_mlp, top_k, width, largest=True)
        self.bottom = _TopK(n_layers, d_mlp, top_k, width, largest=False)
        self.n_tokens = 0
        self.n_prompts = 0
        self._batch: dict[str, torch.Tensor] = {}
        self._layer: dict[str, torch.Tensor] = {}

    def hooks(self) -> list[tuple[str, Callable]]:
        hooks = []
        for layer in self.layers:
            hooks += [
                (act_name("pre", layer), self._keep_pre),
                (act_name("post", layer), partial(self._fold, layer)),
                (act_name("mlp_out", layer), partial(self._finish, layer)),
            ]
        return hooks

    def start_batch(self, tokens: torch.Tensor, valid: torch.Tensor) -> bool:
        """Take the next batch's token ids and valid-token mask [batch, pos]; False when it has no token."""
        prompt_idx, pos_idx = valid.nonzero(as_tuple=True)
        self._batch = {
            "flat": prompt_idx * tokens.shape[1] + pos_idx,  # valid tokens in the flattened [batch * pos]
            "windows": _context_windows(tokens, valid, self.before, self.after)[prompt_idx, pos_idx],
            "where": torch.stack([prompt_idx + self.n_prompts, pos_idx], 1),
        }
        self.n_prompts += tokens.shape[0]
        self.n_tokens += len(prompt_idx)
        return len(prompt_idx) > 0

    def _valid_rows(self, act: torch.Tensor, neurons: slice | None = None) -> torch.Tensor:
        """[T, neurons] float32 (at least): the batch's valid tokens of one layer's activation."""
        flat = act.flatten(0, 1)
        if neurons is not None:
            flat = flat[:, neurons]  # a view: gather the chunk's columns only, not the whole layer per chunk
        rows = flat[self._batch["flat"].to(act.device)]
        return rows.to(torch.promote_types(rows.dtype, torch.float32))

    def _keep_pre(self, act: torch.Tensor, hook) -> None:
        self._layer["pre"] = act.detach()

    def _fold(self, layer: int, post_act: torch.Tensor, hook) -> None:
        pre_act, post_act = self._layer.pop("pre"), post_act.detach()
        if np.isnan(self.edges[layer, 0]):
            self._set_edges(layer, pre_act)
        edges, boundary = self.edges[layer], float(self.params.loc[layer, "boundary"])
        down = self.model.hf_model.model.layers[layer].mlp.down_proj.weight
        n_tokens = len(self._batch["flat"])
        # Two regimes' parts of the MLP output are projected here; the third is the MLP output minus them.
        parts = torch.zeros((2, n_tokens, down.shape[0]), dtype=torch.float32, device=post_act.device)
        for start in range(0, pre_act.shape[-1], self.chunk):
            neurons = slice(start, start + self.chunk)
            pre, post = self._valid_rows(pre_act, neurons), self._valid_rows(post_act, neurons)
            flat = pre.flatten()
            self.outside[layer] += [int((flat < edges[0]).sum()), int((flat > edges[-1]).sum())]
            hist = torch.histc(flat, self.bins, float(edges[0]), float(edges[-1]))
            self.hist[layer] += hist.long().cpu().numpy()
            regime = classify_regimes(pre, boundary)
            post_abs = post.abs()
            for r in range(len(REGIMES)):
                in_r = regime == r
                self.counts[layer, neurons, r] += in_r.sum(0).cpu().numpy()
                self.post_abs[layer, neurons, r] += (
                    torch.where(in_r, post_abs, 0.0).sum(0).double().cpu().numpy()
                )
            # down_proj is linear (Apertus's has no bias), so the MLP output splits exactly by regime; the
            # weight slice is read in float32 a chunk at a time (a view, not a copy, for a float32 model).
            w = down[:, neurons].to(device=post.device, dtype=torch.float32)
            for i, r in enumerate((_FALLING, _RISING)):
                parts[i].addmm_(torch.where(regime == r, post, 0.0), w.T)
            where, windows = self._batch["where"], self._batch["windows"]
            self.top.add(layer, neurons, pre.cpu(), windows, where)
            self.bottom.add(layer, neurons, pre.cpu(), windows, where)
        self._layer["parts"] = parts

    def _finish(self, layer: int, mlp_out: torch.Tensor, hook) -> None:
        falling, rising = self._layer.pop("parts")
        bias = self.model.hf_model.model.layers[layer].mlp.down_proj.bias
        total = self._valid_rows(mlp_out.detach() if bias is None else mlp_out.detach() - bias)
        positive = total - falling - rising
        for r, part in ((_POSITIVE, positive), (_FALLING, falling), (_RISING, rising)):
            self.output_norm[layer, r] += float(part.norm(dim=-1).sum())

    def _set_edges(self, layer: int, pre_act: torch.Tensor) -> None:
        if self.value_range is not None:
            low, high = self.value_range
        else:
            rows = pre_act.flatten(0, 1)[self._batch["flat"].to(pre_act.device)]
            low, high = float(rows.min()), float(rows.max())
            low = min(low, float(self.params.loc[layer, "boundary"]), 0.0)
            high = max(high, 0.0)
            span = max(high - low, 1e-3)
            low, high = low - span / 4, high + span / 4
        self.edges[layer] = np.linspace(low, high, self.bins + 1)

    def result(self, model) -> XIELUStatistics:
        vocab = model.vocabulary_labels()  # each token on its own (partial bytes as hex)
        return XIELUStatistics(
            params=self.params,
            layers=list(self.layers),
            bin_edges=self.edges,
            hist=self.hist,
            outside=self.outside,
            counts=self.counts,
            post_abs=self.post_abs,
            output_norm=self.output_norm,
            top_values=self.top.values,
            top_context=self.top.context,
            top_where=self.top.where,
            bottom_values=self.bottom.values,
            bottom_context=self.bottom.context,
            bottom_where=self.bottom.where,
            context_before=self.before,
            n_tokens=self.n_tokens,
            n_prompts=self.n_prompts,
            token_text=vocab,
        )


class _TopK:
    """The k largest (or smallest) values per neuron seen so far, with where they came from.

    The bounded heap of the textbook, kept for all neurons of all layers at once, in place in fixed arrays
    [layers, neurons, k, ...]: each chunk of neurons is merged with its current k by one `topk`, so memory
    stays [layers, neurons, k] whatever the dataset's size. Context token ids are int32 (vocabularies fit).
    """

    def __init__(self, n_layers: int, n: int, k: int, width: int, largest: bool) -> None:
        self.k, self.largest = k, largest
        self.values = np.full((n_layers, n, k), np.nan, dtype=np.float32)
        self.context = np.full((n_layers, n, k, width), -1, dtype=np.int32)
        self.where = np.full((n_layers, n, k, 2), -1, dtype=np.int64)

    def add(
        self, layer: int, neurons: slice, values: torch.Tensor, windows: torch.Tensor, where: torch.Tensor
    ) -> None:
        # values [T, n] for these neurons, windows [T, width], where [T, 2]
        mine = [torch.from_numpy(a[layer, neurons]) for a in (self.values, self.context, self.where)]
        values_now, context_now, where_now = mine
        fill = -math.inf if self.largest else math.inf
        old = torch.nan_to_num(values_now, nan=fill)
        k = min(self.k, values.shape[0])
        new_values, new_rows = values.float().T.topk(k, dim=1, largest=self.largest)  # [n, k]
        merged = torch.cat([old, new_values], 1)
        best, pick = merged.topk(self.k, dim=1, largest=self.largest)
        from_old = pick < self.k
        old_pick = pick.clamp(max=self.k - 1)
        new_pick = new_rows.gather(1, (pick - self.k).clamp(min=0, max=k - 1))
        context = torch.where(
            from_old[..., None],
            context_now.gather(1, old_pick[..., None].expand_as(context_now)),
            windows[new_pick].to(torch.int32),
        )
        where_ = torch.where(
            from_old[..., None],
            where_now.gather(1, old_pick[..., None].expand_as(where_now)),
            where[new_pick],
        )
        values_now.copy_(torch.where(torch.isinf(best), torch.full_like(best, math.nan), best))
        context_now.copy_(context)
        where_now.copy_(where_)


def _context_windows(tokens: torch.Tensor, valid: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Token ids [batch, pos, before + 1 + after] around every position; -1 outside a prompt or on padding."""
    batch, pos = tokens.shape
    offsets = torch.arange(-before, after + 1)
    index = torch.arange(pos)[:, None] + offsets[None]  # [pos, width]
    inside = (index >= 0) & (index < pos)
    index = index.clamp(0, pos - 1)
    gathered = tokens[:, index]  # [batch, pos, width]
    real = valid | _bos_mask(valid)  # context may show the BOS even when statistics skip it
    ok = inside[None] & real[:, index]
    return torch.where(ok, gathered, torch.full_like(gathered, -1))


def _bos_mask(valid: torch.Tensor) -> torch.Tensor:
    # The one token left of the first valid token in each row (the BOS that skip_bos removed), if any.
    shifted = torch.zeros_like(valid)
    shifted[:, :-1] = valid[:, 1:] & ~valid[:, :-1]
    first_only = shifted & (shifted.long().cumsum(1) == 1)
    return first_only


# ------------------------------------------------------------------------------------------- figures
def xielu_figure(model: HookedApertus, layer: int, stats: XIELUStatistics | None = None) -> go.Figure:
    """One layer's learned curve with its regimes, its minimum, and (with `stats`) the distribution of the
    layer's pre-activations over the dataset as a histogram on a second axis, coloured by regime."""
    model.check_layer(layer)
    params = curve_table(model).loc[layer]
    fig = figures.figure()
    if stats is not None:
        hist = stats.histogram(layer)
        low, high = float(hist.left.iloc[0]), float(hist.right.iloc[-1])
        # Show the rising branch past the minimum even when the data stop short of it.
        low = min(low, 2.5 * float(params.boundary))
    else:
        low, high = min(-8.0, 1.5 * float(params.boundary)), 4.0
    curve = layer_curve(model, layer, torch.linspace(low, high, 600, dtype=torch.float64))
    if stats is not None:
        for regime in REGIMES:
            part = hist[hist.regime == regime]
            fig.add_bar(
                x=part.centre,
                y=part.density,
                width=(hist.right - hist.left).iloc[0],
                yaxis="y2",
                name=f"inputs: {regime}",
                marker_color=REGIME_COLORS[regime],
                opacity=0.45,
            )
    for regime in REGIMES:
        part = curve[curve.regime == regime]
        if len(part):
            fig.add_scatter(
                x=part.x,
                y=part.y,
                mode="lines",
                name=f"xIELU: {regime}",
                line={"color": REGIME_COLORS[regime], "width": 3},
            )
    if not math.isnan(params.x_min):
        fig.add_scatter(
            x=[params.x_min],
            y=[params.y_min],
            mode="markers+text",
            name="minimum",
            text=[f"x* = {params.x_min:.2f}"],
            textposition="bottom center",
            marker={"color": "black", "size": 9},
        )
    title = (
        f"Layer {layer}: xIELU  (alpha_p={params.alpha_p:.3g}, alpha_n={params.alpha_n:.3g}, "
        f"beta={params.beta:.3g})"
    )
    if stats is not None:
        share = stats.regime_shares().loc[layer]
        title += (
            "<br><sup>" + ", ".join(f"{r}: {share[r]:.1%}" for r in REGIMES) + " of pre-activations</sup>"
        )
    fig.update_layout(
        title=title,
        xaxis_title="pre-activation x (mlp.hook_pre)",
        yaxis_title="xIELU(x)",
        yaxis2={
            "title": "density of inputs",
            "overlaying": "y",
            "side": "right",
            "showgrid": False,
            "rangemode": "tozero",
        },
        barmode="overlay",
        legend={"orientation": "h", "y": -0.25},
        height=460,
        margin={"t": 80},
    )
    return fig


def regime_share_figure(stats: XIELUStatistics, kind: str = "activations") -> go.Figure:
    """Stacked bars per layer: the share of pre-activations (`kind="activations"`) or of the MLP output
    norm (`kind="output"`) in each regime."""
    if kind not in ("activations", "output"):
        raise ValueError(f"kind must be 'activations' or 'output', not {kind!r}.")
    table = stats.regime_shares() if kind == "activations" else stats.output_shares()
    fig = figures.figure()
    for regime in REGIMES:
        fig.add_bar(
            x=[f"L{la}" for la in table.index],
            y=table[regime],
            name=regime,
            marker_color=REGIME_COLORS[regime],
        )
    what = "pre-activations" if kind == "activations" else "MLP output norm"
    fig.update_layout(
        barmode="stack",
        title=f"Share of {what} in each xIELU regime",
        yaxis_tickformat=".0%",
        xaxis_title="layer",
        height=360,
    )
    return fig
