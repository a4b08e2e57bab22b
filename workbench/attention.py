"""Attention patterns on demand, and head scores that find previous-token, duplicate-token, induction heads.

A full set of patterns costs layers x heads x pos² numbers: 200 MB per layer of a small model at 4,096 tokens.
So a prompt's forward keeps only each layer's rotated queries and keys (`attn.hook_rot_q` [pos, head, d_head]
and `attn.hook_rot_k` [pos, kv_head, d_head], linear in the length, in the model's dtype, on the CPU; the
model itself runs on fused SDPA), and a pattern is recomputed from them, in float32, for the one layer and
query window being looked at: softmax(q·kᵀ·scaling + causal mask), head h reading KV head
h // (n_heads // n_kv_heads).
The key columns drawn need not be the query window: `attention_window` returns any set of key columns and, per
row, the attention that falls on the keys left out; `top_keys` ranks one query's keys over the whole prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from workbench import figures
from workbench.hooked_model import HookedApertus
from workbench.inputs import batches

SCORES = ("previous_token", "duplicate_token", "induction")
SCORE_TITLES = {
    "previous_token": "previous-token score",
    "duplicate_token": "duplicate-token score",
    "induction": "induction score",
}


@dataclass(frozen=True)
class PromptAttention:
    """What one forward pass keeps of a prompt to draw any of its attention patterns later.

    queries[l]: [pos, head, d_head] and keys[l]: [pos, kv_head, d_head], after QK-norm and RoPE, in the
    model's dtype on the CPU (bf16 halves float32's memory; each pattern is recomputed in float32 from the
    slice it needs); scaling[l] the layer's score scale.
    """

    tokens: torch.Tensor  # [pos]
    str_tokens: list[str]
    queries: tuple[torch.Tensor, ...]
    keys: tuple[torch.Tensor, ...]
    scaling: tuple[float, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_layers(self) -> int:
        return len(self.queries)

    @property
    def n_heads(self) -> int:
        return self.queries[0].shape[1]

    @property
    def n_kv_heads(self) -> int:
        return self.keys[0].shape[1]

    def kv_group(self, head: int) -> int:
        return kv_group(head, self.n_heads, self.n_kv_heads)

    @property
    def nbytes(self) -> int:
        """Memory held by the cached queries and keys."""
        return sum(t.numel() * t.element_size() for t in (*self.queries, *self.keys))


def kv_group(head: int, n_heads: int, n_kv_heads: int) -> int:
    """The key/value head that query head `head` reads under grouped-query attention (as repeat_kv shares)."""
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} KV heads evenly.")
    if not 0 <= head < n_heads:
        raise IndexError(f"head {head!r} is out of range: each layer has {n_heads} heads (0..{n_heads - 1}).")
    return head // (n_heads // n_kv_heads)


def _rot_name(layer: int, which: str) -> str:
    return f"blocks.{layer}.attn.hook_rot_{which}"


def single_prompt_tokens(model: HookedApertus, prompt: str | torch.Tensor | Sequence[int]) -> torch.Tensor:
    """One prompt as token ids [pos] (BOS first for text), with a clear error for a batch."""
    if isinstance(prompt, str):
        return model.to_tokens(prompt)[0]
    tokens = torch.as_tensor(prompt)
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 1:
        raise ValueError(
            f"Give one prompt (a text or token ids [pos]); got a tensor of shape {tuple(tokens.shape)}. "
            "For a batch, call once per row."
        )
    return tokens


def cache_attention(model: HookedApertus, prompt: str | torch.Tensor | Sequence[int]) -> PromptAttention:
    """Run `prompt` once, keeping every layer's rotated queries and keys (no pattern computed or stored)."""
    tokens = single_prompt_tokens(model, prompt)
    names = [_rot_name(layer, w) for layer in range(model.cfg.n_layers) for w in ("q", "k")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None], names_filter=names, return_type=None)
    layers = model.hf_model.model.layers
    return PromptAttention(
        tokens=tokens.detach().cpu(),
        # A token-only model (no tokenizer) labels positions by token id.
        str_tokens=model.token_labels(tokens) if model.tokenizer else [str(t) for t in tokens.tolist()],
        # The model's dtype, not float32: at Apertus-8B widths a 4,096-token prompt is 1.3 GB in bf16.
        queries=tuple(cache[_rot_name(layer, "q")][0].cpu() for layer in range(model.cfg.n_layers)),
        keys=tuple(cache[_rot_name(layer, "k")][0].cpu() for layer in range(model.cfg.n_layers)),
        scaling=tuple(float(layer.self_attn.scaling) for layer in layers),
    )


def _window(window: slice | range | None, length: int, what: str) -> range:
    if window is None:
        return range(length)
    if isinstance(window, slice):
        if window.step not in (None, 1):
            raise ValueError(f"The {what} window must be contiguous (step 1); got {window}.")
        window = range(*window.indices(length))
    if not isinstance(window, range) or window.step != 1 or not len(window):
        raise ValueError(f"The {what} window must be a non-empty contiguous slice or range; got {window!r}.")
    if window.start < 0 or window.stop > length:
        raise IndexError(
            f"The {what} window {window.start}..{window.stop - 1} is outside the prompt's 0..{length - 1}."
        )
    return window


def _key_columns(keys: slice | range | Sequence[int] | None, length: int) -> torch.Tensor:
    """Key positions as a sorted long tensor: a contiguous window, or any increasing positions."""
    if keys is None or isinstance(keys, slice | range):
        cols = _window(keys, length, "key")
        return torch.arange(cols.start, cols.stop)
    cols = torch.as_tensor(list(keys), dtype=torch.long)
    if cols.ndim != 1 or not len(cols) or (len(cols) > 1 and bool((cols[1:] <= cols[:-1]).any())):
        raise ValueError(f"keys must be a window or increasing key positions; got {list(keys)!r}.")
    if int(cols[0]) < 0 or int(cols[-1]) >= length:
        raise IndexError(
            f"key positions {int(cols[0])}..{int(cols[-1])} are outside the prompt's 0..{length - 1}."
        )
    return cols


def _check_layer(attention: PromptAttention, layer: int) -> None:
    if not 0 <= layer < attention.n_layers:
        raise IndexError(
            f"layer {layer!r} is out of range: the model has {attention.n_layers} layers "
            f"(0..{attention.n_layers - 1})."
        )


def _rows_pattern(attention: PromptAttention, layer: int, head_list: list[int], rows: range, reach: int):
    """softmax(q·kᵀ) in float32, query `rows` against keys 0..reach-1 (later keys masked): [h, q, reach]."""
    groups = [attention.kv_group(h) for h in head_list]
    q = attention.queries[layer][rows.start : rows.stop, head_list].float()  # [q, h, d]
    k = attention.keys[layer][:reach, groups].float()  # [k, h, d]
    scores = torch.einsum("qhd,khd->hqk", q, k) * attention.scaling[layer]
    causal = torch.arange(reach)[None, :] > torch.arange(rows.start, rows.stop)[:, None]
    scores.masked_fill_(causal, float("-inf"))
    return torch.softmax(scores, dim=-1)


def attention_window(
    attention: PromptAttention,
    layer: int,
    heads: int | Sequence[int] | None = None,
    *,
    queries: slice | range | None = None,
    keys: slice | range | Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pattern on chosen key columns and, per row, the attention on every key left out.

    Returns (pattern [head, query, key column], outside [head, query]): `keys` may be any increasing key
    positions (e.g. BOS and a window far from the queries); each row is the full softmax over all earlier
    keys, so a row's shown columns and its `outside` sum to 1. Memory: heads x rows x (last position needed).
    An int `heads` drops the head axis.
    """
    _check_layer(attention, layer)
    head_list = (
        list(range(attention.n_heads))
        if heads is None
        else ([heads] if isinstance(heads, int) else list(heads))
    )
    rows = _window(queries, attention.n_tokens, "query")
    cols = _key_columns(keys, attention.n_tokens)
    # Keys after the last query are masked for every row: leave them out of the product.
    reach = max(rows.stop, int(cols[-1]) + 1)
    full = _rows_pattern(attention, layer, head_list, rows, reach)
    shown = torch.zeros(reach, dtype=torch.bool)
    shown[cols] = True
    pattern = full[:, :, cols]
    # Summed over the keys left out (not 1 - shown): exact even when nearly all mass is on screen.
    outside = full[:, :, ~shown].sum(-1)
    if isinstance(heads, int):
        return pattern[0], outside[0]
    return pattern, outside


def attention_pattern(
    attention: PromptAttention,
    layer: int,
    heads: int | Sequence[int] | None = None,
    *,
    queries: slice | range | None = None,
    keys: slice | range | Sequence[int] | None = None,
) -> torch.Tensor:
    """The attention pattern [head, query, key] of `layer` for the chosen heads (all by default).

    Only the query rows in `queries` are computed (softmax over all keys up to the window's last query), and
    only the key columns in `keys` (a window, or increasing positions) are returned, so memory is heads x
    window x (window end) at most. An int `heads` returns [query, key].
    """
    return attention_window(attention, layer, heads, queries=queries, keys=keys)[0]


def top_keys(attention: PromptAttention, layer: int, head: int, query: int, k: int = 10) -> pd.DataFrame:
    """Where query position `query` looks: its `k` most attended keys over the whole prompt, strongest first.

    Columns: key (position), token, attention, cumulative (running share of the row's attention).
    """
    if not 0 <= query < attention.n_tokens:
        raise IndexError(f"query {query!r} is outside the prompt's 0..{attention.n_tokens - 1}.")
    row = attention_pattern(attention, layer, head, queries=range(query, query + 1), keys=range(query + 1))[0]
    top = row.topk(min(k, len(row)))
    keys = top.indices.tolist()
    table = pd.DataFrame(
        {
            "key": keys,
            "token": [attention.str_tokens[i] for i in keys],
            "attention": top.values.double().numpy(),
        }
    )
    table["cumulative"] = table["attention"].cumsum()
    table.index.name = "rank"
    return table


def window_figure(
    attention: PromptAttention,
    pattern: torch.Tensor,
    outside: torch.Tensor,
    rows: range,
    cols: Sequence[int],
    *,
    title: str,
    zmax: float = 1.0,
) -> go.Figure:
    """One head's pattern [query, key column] with token labels, and a last column: attention outside.

    Future cells are blank (null). Key columns need not be contiguous: both axes are categorical.
    """
    cols = [int(c) for c in cols]
    future = torch.tensor(cols)[None, :] > torch.arange(rows.start, rows.stop)[:, None]
    cells = pattern.float().masked_fill(future, float("nan")).numpy()
    tokens = attention.str_tokens
    fig = make_subplots(
        rows=1, cols=2, shared_yaxes=True, column_widths=[0.92, 0.08], horizontal_spacing=0.01
    )
    fig.add_trace(
        figures.heatmap_trace(
            cells,
            x=cols,
            y=list(rows),
            zmin=0,
            zmax=max(zmax, 1e-6),
            hover="query %{y} → key %{x}<br>attention %{z:.3f}<extra></extra>",
            colorbar_title="attention",
            name="pattern",
        ),
        row=1,
        col=1,
    )
    mass = outside.double().numpy()[:, None]
    fig.add_trace(
        figures.heatmap_trace(
            mass,
            x=["outside"],
            y=list(rows),
            zmin=0,
            zmax=1,
            text=[[f"{v:.2f}"] for v in mass[:, 0]],
            hover="query %{y}: %{z:.3f} of its attention<br>on keys not drawn<extra></extra>",
            showscale=False,
            name="outside",
        ),
        row=1,
        col=2,
    )
    size = max(360, min(760, 140 + 16 * max(len(rows), len(cols))))
    fig.update_layout(
        template=figures.TEMPLATE,
        title=title,
        height=size,
        width=size + 180,
        margin={"l": 100, "r": 20, "t": 50, "b": 100},
    )
    labels = figures.token_labels
    fig.update_xaxes(
        type="category",
        tickmode="array",
        tickvals=cols,
        ticktext=labels([tokens[c] for c in cols], cols),
        tickangle=-60,
        title="key (attended to)",
        row=1,
        col=1,
    )
    fig.update_xaxes(type="category", tickangle=-60, row=1, col=2)
    fig.update_yaxes(
        type="category",
        autorange="reversed",
        tickmode="array",
        tickvals=list(rows),
        ticktext=labels(tokens[rows.start : rows.stop], rows),
        title="query (attending)",
        showgrid=False,
        row=1,
        col=1,
    )
    return fig


# ---------------------------------------------------------------------------------------------- head scores
def detection_patterns(tokens: torch.Tensor, query_rows: range | None = None) -> dict[str, torch.Tensor]:
    """Which (query, key) pairs each head type attends to, as TransformerLens's head_detector defines them.

    previous_token: key = query - 1. duplicate_token: an earlier position holding the same token.
    induction: the position right after an earlier occurrence of the query's token (key <= query).
    Bool [query, key] for `query_rows` (all by default) against all keys.
    """
    tokens = torch.as_tensor(tokens).flatten().cpu()
    n = len(tokens)
    rows = range(n) if query_rows is None else query_rows
    q = torch.arange(rows.start, rows.stop)[:, None]
    k = torch.arange(n)[None, :]
    same = tokens[rows.start : rows.stop, None] == tokens[None, :]
    duplicate = same & (k < q)
    # Shift the duplicate pattern one key to the right: attend to the token after the earlier occurrence.
    after = torch.zeros_like(duplicate)
    after[:, 1:] = duplicate[:, :-1]
    return {"previous_token": k == q - 1, "duplicate_token": duplicate, "induction": after & (k <= q)}


def _score_sums(pattern: torch.Tensor, tokens: torch.Tensor, query_rows: range | None = None) -> pd.DataFrame:
    """Per head, the attention on each score's targets summed over query rows, and how many rows have one."""
    detect = detection_patterns(tokens, query_rows)
    out = {}
    for name, mask in detect.items():
        has_target = mask.any(-1)
        # Gather the few target cells rather than multiply the whole pattern in float64: at 4,096 tokens a
        # chunk's pattern is 32 heads x 256 x 4,096, and a float64 copy of it was most of the time.
        query, key = mask.nonzero(as_tuple=True)
        out[f"{name}_sum"] = pattern[:, query, key].double().sum(-1)
        out[f"{name}_rows"] = torch.full((pattern.shape[0],), int(has_target.sum()), dtype=torch.float64)
    return pd.DataFrame({k: v.numpy() for k, v in out.items()})


def _scores_from_sums(sums: pd.DataFrame) -> pd.DataFrame:
    rows = {name: sums[f"{name}_rows"].where(sums[f"{name}_rows"] > 0) for name in SCORES}
    return pd.DataFrame({name: sums[f"{name}_sum"] / rows[name] for name in SCORES})


def score_pattern(pattern: torch.Tensor, tokens: torch.Tensor) -> pd.DataFrame:
    """The three head scores of a full pattern [head, pos, pos] (or [pos, pos]) on `tokens`, one row per head.

    Each score is the attention on the targets of `detection_patterns`, averaged over the query positions
    that have a target (NaN if none has). TransformerLens's `detect_head(..., error_measure="mul")` divides
    the same sum by all positions instead: its score = ours x (positions with a target) / pos.
    """
    pattern = pattern[None] if pattern.ndim == 2 else pattern
    if pattern.shape[-1] != len(tokens) or pattern.shape[-2] != len(tokens):
        raise ValueError(
            f"The pattern covers {tuple(pattern.shape[-2:])} (query, key) positions but there are "
            f"{len(tokens)} tokens: pass the full pattern of these tokens."
        )
    table = _scores_from_sums(_score_sums(pattern.detach().cpu(), torch.as_tensor(tokens).cpu()))
    table.index.name = "head"
    return table


def head_scores(
    model: HookedApertus,
    input: str | Sequence[str] | torch.Tensor,
    *,
    chunk: int = 256,
    progress: bool = True,
) -> pd.DataFrame:
    """Previous-token, duplicate-token and induction scores of every head, indexed by (layer, head).

    A score is the attention a head puts on its targets (see `detection_patterns`), averaged over the query
    positions that have a target: on a repeated random sequence the induction score is the mean attention from
    each token of the later copy to the token after its earlier occurrence, the induction-heads literature's
    measure. Several prompts (texts, or token rows [batch, pos]) pool their query positions. Patterns are
    computed `chunk` query rows at a time, so a long prompt never holds a full pos x pos pattern.
    Columns: kv_group, previous_token, duplicate_token, induction (NaN where no position has a target).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of query rows; got {chunk}.")
    if isinstance(input, torch.Tensor):
        prompts = list(input) if input.ndim == 2 else [input]
    elif isinstance(input, str):
        prompts = [input]
    else:
        prompts = list(input)
    if not prompts:
        raise ValueError("No prompt given: pass a text, a list of texts or token ids [batch, pos].")
    cfg = model.cfg
    totals = None
    steps = len(prompts) * cfg.n_layers
    with tqdm(total=steps, desc="head scores", disable=not progress or steps < 2) as bar:
        for prompt in prompts:
            attention = cache_attention(model, prompt)
            for layer in range(cfg.n_layers):
                for rows in batches(range(attention.n_tokens), chunk):
                    pattern = attention_pattern(attention, layer, queries=rows, keys=range(rows.stop))
                    sums = _score_sums(pattern, attention.tokens[: rows.stop], rows)
                    sums.index = pd.MultiIndex.from_product(
                        [[layer], range(cfg.n_heads)], names=["layer", "head"]
                    )
                    totals = sums if totals is None else totals.add(sums, fill_value=0)
                bar.update()
    table = _scores_from_sums(totals)
    table.insert(0, "kv_group", [kv_group(h, cfg.n_heads, cfg.n_key_value_heads) for _, h in table.index])
    return table


def head_scores_figure(scores: pd.DataFrame, score: str = "induction") -> go.Figure:
    """A layer x head heatmap of one column of `head_scores` (0..1, each cell labelled with its value)."""
    if score not in SCORES:
        raise ValueError(f"Unknown score {score!r}: choose one of {', '.join(SCORES)}.")
    grid = scores[score].unstack("head")
    return figures.heatmap(
        grid.to_numpy(dtype=float),  # NaN (no position had a target) is a blank cell
        x=[f"H{h}" for h in grid.columns],
        y=[f"L{layer}" for layer in grid.index],
        zmin=0,
        zmax=1,
        text=grid.round(2).astype(object).where(grid.notna(), "").to_numpy().tolist(),
        hover="layer %{y} head %{x}<br>score %{z:.3f}<extra></extra>",
        colorbar_title="score",
        title=SCORE_TITLES[score],
        x_title="head",
        y_title="layer",
    )
