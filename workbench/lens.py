"""Residual-stream lenses: the logit lens, direct logit attribution, and the residual decomposition.

Apertus ends with `logits = (resid / rms(resid)) * norm.weight @ W_U`, where rms(resid) =
sqrt(mean(resid^2) + eps) is a number per token (`ln_final.hook_scale`). Two ways to read the residual
stream through it:

* The **logit lens** reads every layer's residual stream as if it were the last: each gets its *own*
  RMS scale, then the final norm's weight and W_U. At the last layer it is the model's logits.
* **Direct logit attribution** (DLA) splits the final residual stream into the parts written by the
  embedding, every attention head and every MLP, and divides each by the scale *of the actual run*. With
  the scale frozen the map to logits is linear, so the parts' attributions sum exactly to the logit (or
  logit difference) the model produced.

The decomposition: resid_final = embedding + sum over layers and heads of head outputs + sum of MLP
outputs. Apertus's attention and MLP projections have no bias, so nothing else is written to the stream;
for a checkpoint whose o_proj or down_proj has a bias, the biases are listed as components of their own.
What remains between the parts' sum and the stream is floating-point rounding only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from transformer_lens.ActivationCache import ActivationCache

from workbench import figures
from workbench.hooked_model import HookedApertus, Input
from workbench.inputs import batches, last_token_index
from workbench.names import act_name, resid_labels, resid_names

TokenLike = int | str


# ----------------------------------------------------------------------------------------- logit lens
def final_norm(model: HookedApertus, resid: torch.Tensor) -> torch.Tensor:
    """The final RMSNorm applied to any residual stream with its own scale, exactly as the model does."""
    return model.ln_final(resid)


def unembed(model: HookedApertus, normed: torch.Tensor) -> torch.Tensor:
    """Logits from a normalised residual stream (the model's own output head)."""
    return model.unembed(normed)


def layer_labels(model: HookedApertus) -> list[str]:
    """Names of the logit lens's rows, the residual streams 0..n_layers in the engine's one numbering
    (TransformerLens's `accumulated_resid` labels): "0_pre" (the embedding), "1_pre", ..., "final_post"."""
    return resid_labels(model.cfg.n_layers)


def lens_logits(
    model: HookedApertus, input: Input, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logit-lens logits [n_layers + 1, batch, pos, d_vocab]: row 0 reads the embeddings, row l + 1 the
    residual stream after layer l (row n_layers is the model's output).

    This is every logit at once (about 1 MB per layer and token with a 131k vocabulary): the tables and
    figures below never build it, they read it in chunks (`logit_lens_topk`, `target_trajectory`).
    """
    with torch.no_grad():
        return torch.stack(
            [unembed(model, final_norm(model, s)) for s in _streams(model, input, attention_mask)]
        )


def _streams(model, input, attention_mask=None, position: int | None = None) -> torch.Tensor:
    """The lens's residual streams [n_layers + 1, batch, pos, d_model], TransformerLens's
    `accumulated_resid` of a cache of them (only `position`, kept as a length-1 axis, when one is given:
    the forward then stops there, since later tokens cannot change it)."""
    tokens, mask = _tokens_and_mask(model, input, attention_mask)
    if position is not None:
        tokens = tokens[:, : position + 1]
        mask = None if mask is None else mask[:, : position + 1]
        position = torch.full((tokens.shape[0],), position)
    cache, _ = run_cache(model, tokens, mask, resid_names(model.cfg.n_layers), position)
    return cache.accumulated_resid()


def run_cache(
    model: HookedApertus,
    tokens: torch.Tensor,
    mask: torch.Tensor | None,
    names: Sequence[str],
    positions: torch.Tensor | None = None,
    logits: bool = False,
) -> tuple[ActivationCache, torch.Tensor | None]:
    """TransformerLens's `ActivationCache` of `names` from one run (and the logits when asked).

    positions: None keeps every position; else one position per prompt [batch], taken by the hooks as the
    forward passes, so each activation keeps a length-1 `pos` axis and the cache holds batch x (not
    batch x pos) of each; the logits are then computed at those positions only.
    """
    rows = torch.arange(tokens.shape[0])
    kept: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook) -> None:
        if positions is None:
            kept[hook.name] = act.detach()
        else:
            kept[hook.name] = act[rows.to(act.device), positions.to(act.device)][:, None].clone()

    final = act_name("resid_post", model.cfg.n_layers - 1)
    wanted = list(dict.fromkeys([*names, final] if logits and positions is not None else names))
    with torch.no_grad():
        out = model.run_with_hooks(
            tokens,
            attention_mask=mask,
            fwd_hooks=[(n, keep) for n in wanted],
            return_type="logits" if logits and positions is None else None,
        )
        if logits and positions is not None:  # the model's own norm and head, at the kept positions only
            out = model.unembed(model.ln_final(kept[final]))
    return ActivationCache(kept, model), out


def _logit_chunks(model: HookedApertus, streams: torch.Tensor, vocab_chunk: int, first: int = 0):
    """(start, float32 logits [rows, chunk]) over the vocabulary, for residual streams [rows, d_model], each
    read with its own final-norm scale; the same numbers as the model's output head, a chunk at a time."""
    head = model.output_head
    normed = final_norm(model, streams).to(head.weight.device)
    for start in range(first, head.weight.shape[0], vocab_chunk):
        bias = None if head.bias is None else head.bias[start : start + vocab_chunk]
        yield start, F.linear(normed, head.weight[start : start + vocab_chunk], bias).float()


def logit_lens_topk(
    model: HookedApertus,
    input: Input,
    k: int = 5,
    *,
    attention_mask: torch.Tensor | None = None,
    row_chunk: int = 256,
    vocab_chunk: int = 16384,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logit lens's top k per layer and position without holding its logits: (logits, token ids, log of
    the softmax normaliser), the first two [n_layers + 1, batch, pos, k], the last [n_layers + 1, batch, pos];
    a candidate's probability is exp(logit - normaliser).

    The streams are read `row_chunk` (layer, position) pairs at a time against `vocab_chunk` rows of the
    unembedding, so memory beyond the cached streams is row_chunk x vocab_chunk floats.
    """
    streams = _streams(model, input, attention_mask)
    shape = streams.shape[:-1]
    rows = streams.flatten(0, -2)
    k = min(k, model.cfg.d_vocab)
    top_logit = torch.empty((len(rows), k))
    top_id = torch.empty((len(rows), k), dtype=torch.long)
    log_norm = torch.empty(len(rows))
    for span in batches(range(len(rows)), row_chunk):
        part = slice(span.start, span.stop)
        best = torch.full((len(span), 0), -torch.inf)
        ids = torch.empty(best.shape, dtype=torch.long)
        lse = torch.full(best.shape[:1], -torch.inf)
        for start, logits in _logit_chunks(model, rows[part], vocab_chunk):
            logits = logits.cpu()
            lse = torch.logaddexp(lse, logits.logsumexp(-1))
            values, where = logits.topk(min(k, logits.shape[-1]), dim=-1)
            best, pick = torch.cat([best, values], -1).topk(min(k, best.shape[-1] + values.shape[-1]), dim=-1)
            ids = torch.cat([ids, where + start], -1).gather(-1, pick)
        top_logit[part], top_id[part], log_norm[part] = best, ids, lse
    return top_logit.view(*shape, k), top_id.view(*shape, k), log_norm.view(shape)


def _single_prompt(model: HookedApertus, prompt: str | torch.Tensor) -> torch.Tensor:
    if isinstance(prompt, str):
        return model.to_tokens(prompt)
    if isinstance(prompt, torch.Tensor):
        tokens = prompt[None] if prompt.ndim == 1 else prompt
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            return tokens
    raise ValueError("The lens views take one prompt: a text or a [pos] / [1, pos] tensor of token ids.")


def logit_lens_table(model: HookedApertus, prompt: str | torch.Tensor, k: int = 5) -> pd.DataFrame:
    """Top-k tokens of the logit lens for one prompt: one row per layer x position x rank, with the
    candidate token, its probability and logit, and the token actually at that position."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, not {k!r}.")
    tokens = _single_prompt(model, prompt)
    top_logit, top_id, log_norm = logit_lens_topk(model, tokens, k)
    top_logit, top_id, log_norm = top_logit[:, 0], top_id[:, 0], log_norm[:, 0]
    top_p = (top_logit - log_norm[..., None]).exp()
    labels, here = layer_labels(model), model.token_labels(tokens[0])
    unique = top_id.unique().tolist()
    texts = dict(zip(unique, model.token_labels(unique)))
    rows = []
    for li, label in enumerate(labels):
        for pos in range(tokens.shape[1]):
            for rank in range(top_id.shape[-1]):
                token = int(top_id[li, pos, rank])
                rows.append(
                    {
                        "layer": label,
                        "layer_index": li,
                        "position": pos,
                        "input_token": here[pos],
                        "rank": rank,
                        "token": texts[token],
                        "token_id": token,
                        "prob": float(top_p[li, pos, rank]),
                        "logit": float(top_logit[li, pos, rank]),
                    }
                )
    return pd.DataFrame(rows)


def logit_lens_figure(model: HookedApertus, prompt: str | torch.Tensor, k: int = 5) -> go.Figure:
    """Heatmap of the logit lens: layers (rows) x positions (columns), coloured by the top token's
    probability and labelled with it; hover shows the top k."""
    table = logit_lens_table(model, prompt, k)
    top = table[table["rank"] == 0].pivot(index="layer_index", columns="position", values="prob")
    text = table[table["rank"] == 0].pivot(index="layer_index", columns="position", values="token")
    hover = (
        table.groupby(["layer_index", "position"])
        .apply(
            lambda g: "<br>".join(
                f"{figures.escape_label(repr(t))}: {p:.2f}" for t, p in zip(g.token, g.prob)
            ),
            include_groups=False,
        )
        .unstack()
    )
    inputs = table.drop_duplicates("position").sort_values("position").input_token.tolist()
    labels = layer_labels(model)
    return figures.heatmap(
        top.values,
        x=figures.token_labels(inputs),
        y=labels,
        text=text.map(figures.escape_label).values,
        customdata=hover.values,
        hover="%{y} @ %{x}<br>%{customdata}<extra></extra>",
        zmin=0,
        zmax=1,
        colorbar_title="p(top)",
        title="Logit lens: the top token read from each layer's residual stream",
        x_title="position: input token",
        y_title="residual stream (i_pre: input of layer i)",
    )


def target_trajectory(
    model: HookedApertus, prompt: str | torch.Tensor, target: TokenLike, position: int = -1
) -> pd.DataFrame:
    """Rank (0 = top), probability and logit of `target` at one position, read through the logit lens at
    every layer."""
    tokens = _single_prompt(model, prompt)
    pos = _check_position(position, tokens.shape[1])
    target_id = _token_id(model, target)
    streams = _streams(model, tokens, position=pos)[:, 0, 0]  # [layers + 1, d_model]
    chunk = 16384
    # The target's own chunk first, so that its logit is the very number compared with the others.
    first = target_id - target_id % chunk
    target_logit = next(_logit_chunks(model, streams, chunk, first))[1][:, target_id - first].cpu()
    rank = torch.zeros(len(streams), dtype=torch.long)
    log_norm = torch.full((len(streams),), -torch.inf)
    for _, logits in _logit_chunks(model, streams, chunk):
        logits = logits.cpu()
        rank += (logits > target_logit[:, None]).sum(-1)
        log_norm = torch.logaddexp(log_norm, logits.logsumexp(-1))
    return pd.DataFrame(
        {
            "layer": layer_labels(model),
            "rank": rank.tolist(),
            "prob": (target_logit - log_norm).exp().tolist(),
            "logit": target_logit.tolist(),
        }
    )


def trajectory_figure(table: pd.DataFrame, target: str = "target") -> go.Figure:
    """Probability (left axis) and rank (right axis, log scale) of the target token across layers."""
    fig = figures.figure()
    fig.add_scatter(x=table.layer, y=table.prob, name="probability", mode="lines+markers")
    fig.add_scatter(
        x=table.layer,
        y=table["rank"] + 1,
        name="rank + 1",
        mode="lines+markers",
        yaxis="y2",
        line={"dash": "dot"},
    )
    fig.update_layout(
        title=f"{target!r} through the layers (logit lens)",
        yaxis={"title": "probability", "range": [0, 1]},
        yaxis2={
            "title": "rank + 1",
            "type": "log",
            "overlaying": "y",
            "side": "right",
            "autorange": "reversed",
        },
        height=340,
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


# --------------------------------------------------------------------------- residual decomposition
@dataclass
class Decomposition:
    """The final residual stream split into the parts that wrote it.

    components: [n_components, batch, pos, d_model]; labels/kinds/layers/heads describe each row (head is
    -1 for embed/MLP/bias rows). final_resid: the stream entering the final norm; scale: the final norm's
    RMS scale from the same run [batch, pos, 1]; logits: the model's output [batch, pos, vocab].
    positions: None when every position is kept; else the one position kept per prompt [batch], and the
    `pos` axis of every tensor above has length 1 (it holds that position). cache: the run's
    `ActivationCache` of what the decomposition read (for TransformerLens's methods).
    """

    labels: list[str]
    kinds: list[str]
    layers: list[int]
    heads: list[int]
    components: torch.Tensor
    final_resid: torch.Tensor
    scale: torch.Tensor
    logits: torch.Tensor
    attention_mask: torch.Tensor | None
    positions: torch.Tensor | None = None
    cache: ActivationCache | None = field(default=None, repr=False)  # TransformerLens's, of what was kept

    def max_error(self) -> float:
        """Largest |sum of parts - final residual| over every entry (floating-point rounding only)."""
        return float((self.components.sum(0) - self.final_resid).abs().max())

    def table(self, batch: int = 0, position: int = -1) -> pd.DataFrame:
        """Per component at one token: its norm, and its projection on the final residual's direction
        (the parts' projections sum to the final residual's norm). With one position kept per prompt,
        `position` is ignored: the table is of the kept one."""
        pos = 0 if self.positions is not None else _check_position(position, self.final_resid.shape[1])
        parts = self.components[:, batch, pos].float()
        final = self.final_resid[batch, pos].float()
        unit = final / final.norm()
        return pd.DataFrame(
            {
                "component": self.labels,
                "kind": self.kinds,
                "layer": self.layers,
                "head": self.heads,
                "norm": parts.norm(dim=-1).tolist(),
                "along_final": (parts @ unit).tolist(),
            }
        )


def residual_decomposition(
    model: HookedApertus,
    input: Input,
    attention_mask: torch.Tensor | None = None,
    *,
    positions: int | Sequence[int] | torch.Tensor | None = None,
) -> Decomposition:
    """Run once and split the final residual stream into embedding + every head + every MLP (+ biases, if a
    checkpoint has them). The head outputs are `hook_z` times each head's slice of o_proj, as
    `attn.hook_result` would give.

    positions: None keeps every position; a position (or one per prompt) keeps only that one, read by hooks
    as the forward passes, so memory is components x batch x d_model instead of x pos (and logits only
    there, not [batch, pos, vocab]).
    """
    tokens, mask = _tokens_and_mask(model, input, attention_mask)
    batch, length = tokens.shape
    if positions is not None:
        positions = _positions(positions, batch, length)
    cfg = model.cfg
    final = act_name("resid_post", cfg.n_layers - 1)
    names = [act_name("embed"), act_name("scale"), final]
    names += [act_name(kind, la) for la in range(cfg.n_layers) for kind in ("z", "mlp_out")]
    cache, logits = run_cache(model, tokens, mask, names, positions, logits=True)
    with torch.no_grad():
        # TransformerLens's decomposition (heads from hook_z and W_O, MLPs, embedding, as
        # `cache.get_full_resid_decomposition` gives), with a row per biased o_proj (Apertus has none)
        # instead of its one "bias" row, in the order the stream is written. Filled layer by layer into one
        # tensor: building TransformerLens's stack (every head's result, then a concatenation) and reordering
        # it held three copies of [components, batch, pos, d_model] at once; this holds one, plus one layer's
        # heads.
        resid = cache[final]
        biased = [model.hf_model.model.layers[la].self_attn.o_proj.bias for la in range(cfg.n_layers)]
        n = 1 + cfg.n_layers * (cfg.n_heads + 1) + sum(b is not None for b in biased)
        components = resid.new_empty((n, *resid.shape))
        components[0] = cache[act_name("embed")].to(resid.device)
        labels, kinds, layers, heads = ["embed"], ["embed"], [-1], [-1]
        for la in range(cfg.n_layers):
            row = len(labels)
            attn = model.blocks[la].attn
            result = torch.einsum("bphd,hdm->bphm", cache[act_name("z", la)], attn.W_O)  # as hook_result
            components[row : row + cfg.n_heads] = result.permute(2, 0, 1, 3).to(resid.device)
            del result
            labels += [f"L{la}H{h}" for h in range(cfg.n_heads)]
            kinds += ["head"] * cfg.n_heads
            layers += [la] * cfg.n_heads
            heads += list(range(cfg.n_heads))
            if biased[la] is not None:
                components[len(labels)] = biased[la].to(resid.device).expand_as(resid)
                labels.append(f"L{la} attn bias")
                kinds.append("bias")
                layers.append(la)
                heads.append(-1)
            components[len(labels)] = cache[act_name("mlp_out", la)].to(resid.device)
            labels.append(f"L{la} MLP")
            kinds.append("mlp")
            layers.append(la)
            heads.append(-1)
    return Decomposition(
        labels,
        kinds,
        layers,
        heads,
        components,
        cache[final],
        cache[act_name("scale")],
        logits,
        mask,
        positions,
        cache,
    )


def _tokens_and_mask(model, input: Input, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(input, torch.Tensor):
        return (input[None] if input.ndim == 1 else input), attention_mask
    return model.tokenize(input)


def _positions(positions, batch: int, length: int) -> torch.Tensor:
    if isinstance(positions, torch.Tensor):
        positions = positions.tolist()
    if isinstance(positions, int):
        positions = [positions] * batch
    if len(positions) != batch:
        raise ValueError(
            f"{len(positions)} positions for {batch} prompts: give one per prompt, or one for all."
        )
    return torch.tensor([_check_position(p, length) for p in positions], dtype=torch.long)


# -------------------------------------------------------------------------- direct logit attribution
def direct_logit_attribution(
    model: HookedApertus,
    input: Input,
    answer: TokenLike | Sequence[TokenLike],
    wrong: TokenLike | Sequence[TokenLike] | None = None,
    *,
    position: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Each component's direct contribution to logit(answer) - logit(wrong) (or to logit(answer) alone when
    `wrong` is None), averaged over the batch.

    answer/wrong: a single-token text (" Mary"), a token id, or one of those per prompt. position: the token
    whose logits are explained; None means each prompt's last real token (padding is skipped).
    The final norm's scale is taken from this run (`ln_final.hook_scale`), so the attributions sum to the
    model's own logit difference; `.attrs` holds `total` (the model's mean logit difference), `sum` (of the
    attributions), `per_prompt` (the model's logit difference of each prompt) and `per_prompt_sum` (of the
    attributions, per prompt). Only the explained position of each prompt is kept from the run.
    """
    tokens, mask = _tokens_and_mask(model, input, attention_mask)
    batch, length = tokens.shape
    if position is None:
        positions = last_token_index(mask).cpu() if mask is not None else torch.full((batch,), length - 1)
    else:
        positions = torch.full((batch,), _check_position(position, length))
    answers = _token_ids(model, answer, batch, "answer")
    wrongs = None if wrong is None else _token_ids(model, wrong, batch, "wrong")
    dec = residual_decomposition(model, tokens, mask, positions=positions)

    # TransformerLens's logit_attrs: the parts over the run's final-norm scale, read along
    # model.tokens_to_residual_directions (W_U columns times the final norm's weight).
    per_prompt = dec.cache.logit_attrs(
        dec.components, tokens=answers, incorrect_tokens=wrongs, has_batch_dim=True
    )[..., 0]  # [n, batch]
    rows = torch.arange(batch)
    out = dec.logits[:, 0].cpu()
    total = out[rows, answers] - (out[rows, wrongs] if wrongs is not None else 0)
    table = pd.DataFrame(
        {
            "component": dec.labels,
            "kind": dec.kinds,
            "layer": dec.layers,
            "head": dec.heads,
            "attribution": per_prompt.float().mean(1).tolist(),
        }
    )
    table.attrs.update(
        total=float(total.float().mean()),
        sum=float(per_prompt.sum(0).float().mean()),
        # Plain lists: pandas compares attrs when it combines frames, which tensors would make ambiguous.
        per_prompt=total.float().tolist(),
        per_prompt_sum=per_prompt.sum(0).float().tolist(),
    )
    return table


def dla_figure(table: pd.DataFrame, title: str = "Direct logit attribution") -> go.Figure:
    """Heatmap layers x (heads, MLP) of a `direct_logit_attribution` table (diverging colours around 0);
    the embedding's share is in the title."""
    heads = table[table.kind == "head"]
    grid = heads.pivot(index="layer", columns="head", values="attribution")
    mlp = table[table.kind == "mlp"].set_index("layer").attribution
    grid.columns = [f"H{h}" for h in grid.columns]
    grid["MLP"] = mlp
    embed = float(table[table.kind == "embed"].attribution.sum())
    total = table.attrs.get("total")
    sub = f"embedding {embed:+.2f}" + (f", total {total:+.2f}" if total is not None else "")
    return figures.heatmap(
        grid.values,
        x=list(grid.columns),
        y=[f"L{la}" for la in grid.index],
        diverging=True,
        text=grid.round(2).values,
        colorbar_title="logit",
        title=f"{title}<br><sup>{sub}</sup>",
        x_title="head / MLP",
        y_title="layer",
    )


# ----------------------------------------------------------------------------------------- helpers
def _check_position(position: int, length: int) -> int:
    if not isinstance(position, int) or isinstance(position, bool) or not -length <= position < length:
        raise IndexError(
            f"position {position!r} is out of range for a prompt of {length} tokens "
            f"({-length}..{length - 1})."
        )
    return position % length


def _token_id(model: HookedApertus, token: TokenLike) -> int:
    if isinstance(token, str):
        return model.to_single_token(token)  # refuses texts that become the unknown token
    if isinstance(token, int) and not isinstance(token, bool) and 0 <= token < model.cfg.d_vocab:
        return token
    raise ValueError(
        f"{token!r} is not a token: give a single-token text such as ' Mary' or an id in "
        f"0..{model.cfg.d_vocab - 1}."
    )


def _token_ids(model: HookedApertus, tokens, batch: int, what: str) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    if isinstance(tokens, (str, int)):
        tokens = [tokens] * batch
    tokens = list(tokens)
    if len(tokens) != batch:
        raise ValueError(
            f"{len(tokens)} {what} tokens for {batch} prompts: give one per prompt, or one for all."
        )
    return torch.tensor([_token_id(model, t) for t in tokens], dtype=torch.long)
