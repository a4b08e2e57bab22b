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
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch

from workbench import figures
from workbench.hooked_model import HookedApertus, Input

TokenLike = int | str


# ----------------------------------------------------------------------------------------- logit lens
def final_norm(model: HookedApertus, resid: torch.Tensor) -> torch.Tensor:
    """The final RMSNorm applied to any residual stream with its own scale, exactly as the model does."""
    norm = model.hf_model.model.norm
    x32 = resid.to(torch.float32)
    scale = torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * (x32 / scale).to(resid.dtype)


def unembed(model: HookedApertus, normed: torch.Tensor) -> torch.Tensor:
    """Logits from a normalised residual stream (the model's own output head)."""
    head = model.hf_model.lm_head if hasattr(model.hf_model, "lm_head") else model.hf_model.score
    return head(normed.to(head.weight.device))


def layer_labels(model: HookedApertus) -> list[str]:
    """Names of the logit lens's rows: the embedding, then the output of each layer."""
    return ["embed"] + [f"L{layer}" for layer in range(model.cfg.n_layers)]


def lens_logits(
    model: HookedApertus, input: Input, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logit-lens logits [n_layers + 1, batch, pos, d_vocab]: row 0 reads the embeddings, row l + 1 the
    residual stream after layer l (row n_layers is the model's output)."""
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{la}.hook_resid_post" for la in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(
            input, attention_mask=attention_mask, names_filter=names, return_type=None
        )
        return torch.stack([unembed(model, final_norm(model, cache[name])) for name in names])


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
    logits = lens_logits(model, tokens)[:, 0].float()  # [layers + 1, pos, vocab]
    probs = logits.softmax(-1)
    top_p, top_id = probs.topk(min(k, probs.shape[-1]), dim=-1)
    labels, here = layer_labels(model), model.to_str_tokens(tokens[0])
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
                        "token": model._token_text(token),
                        "token_id": token,
                        "prob": float(top_p[li, pos, rank]),
                        "logit": float(logits[li, pos, token]),
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
        y_title="residual stream after",
    )


def target_trajectory(
    model: HookedApertus, prompt: str | torch.Tensor, target: TokenLike, position: int = -1
) -> pd.DataFrame:
    """Rank (0 = top), probability and logit of `target` at one position, read through the logit lens at
    every layer."""
    tokens = _single_prompt(model, prompt)
    pos = _check_position(position, tokens.shape[1])
    target_id = _token_id(model, target)
    logits = lens_logits(model, tokens)[:, 0, pos].float()  # [layers + 1, vocab]
    probs = logits.softmax(-1)
    target_logit = logits[:, target_id]
    rank = (logits > target_logit[:, None]).sum(-1)
    return pd.DataFrame(
        {
            "layer": layer_labels(model),
            "rank": rank.tolist(),
            "prob": probs[:, target_id].tolist(),
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
    RMS scale from the same run [batch, pos, 1]; logits: the model's output.
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

    def max_error(self) -> float:
        """Largest |sum of parts - final residual| over every entry (floating-point rounding only)."""
        return float((self.components.sum(0) - self.final_resid).abs().max())

    def table(self, batch: int = 0, position: int = -1) -> pd.DataFrame:
        """Per component at one token: its norm, and its projection on the final residual's direction
        (the parts' projections sum to the final residual's norm)."""
        pos = _check_position(position, self.final_resid.shape[1])
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
    model: HookedApertus, input: Input, attention_mask: torch.Tensor | None = None
) -> Decomposition:
    """Run once and split the final residual stream into embedding + every head + every MLP (+ biases, if a
    checkpoint has them). The head outputs are `hook_z` times each head's slice of o_proj, as
    `attn.hook_result` would give."""
    cfg = model.cfg
    names = ["hook_embed", "ln_final.hook_scale", f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
    names += [f"blocks.{la}.attn.hook_z" for la in range(cfg.n_layers)]
    names += [f"blocks.{la}.hook_mlp_out" for la in range(cfg.n_layers)]
    with torch.no_grad():
        logits, cache = model.run_with_cache(input, attention_mask=attention_mask, names_filter=names)
        parts, labels, kinds, layers, heads = [cache["hook_embed"]], ["embed"], ["embed"], [-1], [-1]
        for la, decoder in enumerate(model.hf_model.model.layers):
            o_proj = decoder.self_attn.o_proj
            w_o = o_proj.weight.view(o_proj.out_features, cfg.n_heads, cfg.d_head)
            z = cache[f"blocks.{la}.attn.hook_z"]
            per_head = torch.einsum("bphd,mhd->hbpm", z, w_o.to(z.device))
            for h in range(cfg.n_heads):
                parts.append(per_head[h])
                labels.append(f"L{la}H{h}")
                kinds.append("head")
                layers.append(la)
                heads.append(h)
            if o_proj.bias is not None:
                parts.append(o_proj.bias.expand_as(per_head[0]))
                labels.append(f"L{la} attn bias")
                kinds.append("bias")
                layers.append(la)
                heads.append(-1)
            parts.append(cache[f"blocks.{la}.hook_mlp_out"])
            labels.append(f"L{la} MLP")
            kinds.append("mlp")
            layers.append(la)
            heads.append(-1)
        device = parts[0].device
        components = torch.stack([p.to(device) for p in parts])
    mask = None
    if not isinstance(input, torch.Tensor):
        _, mask = model._tokenize(input)
    elif attention_mask is not None:
        mask = attention_mask
    return Decomposition(
        labels,
        kinds,
        layers,
        heads,
        components,
        cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"],
        cache["ln_final.hook_scale"],
        logits,
        mask,
    )


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
    attributions, per prompt).
    """
    dec = residual_decomposition(model, input, attention_mask)
    batch, length = dec.final_resid.shape[:2]
    if position is None:
        if dec.attention_mask is not None:
            mask = dec.attention_mask.bool()
            positions = torch.tensor([int(row.nonzero().max()) for row in mask])
        else:
            positions = torch.full((batch,), length - 1)
    else:
        positions = torch.full((batch,), _check_position(position, length))
    answers = _token_ids(model, answer, batch, "answer")
    wrongs = None if wrong is None else _token_ids(model, wrong, batch, "wrong")

    rows = torch.arange(batch)
    device = dec.components.device
    rows_d, positions_d = rows.to(device), positions.to(device)
    w_u = model.W_U.to(device)
    direction = w_u[:, answers.to(device)].T  # [batch, d_model]
    if wrongs is not None:
        direction = direction - w_u[:, wrongs.to(device)].T
    direction = direction * model.hf_model.model.norm.weight.to(device)
    scale = dec.scale[rows_d, positions_d].to(device)  # [batch, 1]
    parts = dec.components[:, rows_d, positions_d]  # [n, batch, d_model]
    per_prompt = ((parts / scale) * direction).sum(-1)  # [n, batch]

    out = dec.logits[rows_d, positions_d]
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
        return model.to_single_token(token)
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
