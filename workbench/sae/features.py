"""What an SAE's features are about: one streaming pass over a dataset, and their output directions.

:func:`feature_statistics` runs prompts through the model (up to the SAE's layer) and keeps, with memory
fixed by the SAE's width (not the dataset's size): each latent's activation frequency and mean, a
log-spaced histogram of its positive activations, its ``top_k`` top-activating tokens, and ``top_k``
*typical* ones (a uniform random sample of the tokens where it is active, by reservoir sampling), each with
the tokens around it and the latent's activation on every one of them.

:func:`feature_output_tokens` reads a feature's decoder direction through the unembedding (chunked over
the vocabulary, so a 131k vocabulary needs no [d_sae, vocab] matrix); :func:`nearest_features` ranks the
other latents by decoder cosine.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from workbench.inputs import batches
from workbench.sae.metrics import encode_prompts, replaced_positions
from workbench.sae.model import SparseAutoencoder
from workbench.sae.splice import check_feature

__all__ = [
    "FeatureStatistics",
    "feature_output_tokens",
    "feature_statistics",
    "nearest_features",
    "residual_direction",
]

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class FeatureStatistics:
    """One pass of :func:`feature_statistics`. F latents, K examples each, C = before + 1 + after tokens."""

    frequency: np.ndarray  # [F] share of tokens where the latent is active
    mean_activation: np.ndarray  # [F] mean activation where active
    bin_edges: np.ndarray  # [B + 1] log-spaced activation bins
    hist: np.ndarray  # [F, B] counts of positive activations (clipped into the first/last bin)
    top_values: np.ndarray  # [F, K] descending; NaN = empty slot
    top_context: np.ndarray  # [F, K, C] token ids (-1 = none); the example token sits at `before`
    top_context_acts: np.ndarray  # [F, K, C] the latent's activation on each context token
    typical_values: np.ndarray  # [F, K]
    typical_context: np.ndarray  # [F, K, C]
    typical_context_acts: np.ndarray  # [F, K, C]
    before: int
    n_tokens: int
    token_text: list[str] = field(repr=False, default_factory=list)

    def examples(self, feature: int, which: str = "top") -> pd.DataFrame:
        """The feature's top (``"top"``) or typical (``"typical"``) examples: value, the token, its context
        (token texts), the activation on each context token and the example's index in the context."""
        if which not in ("top", "typical"):
            raise ValueError(f"which must be 'top' or 'typical', not {which!r}.")
        values = getattr(self, f"{which}_values")[feature]
        context = getattr(self, f"{which}_context")[feature]
        acts = getattr(self, f"{which}_context_acts")[feature]
        order = np.argsort(-np.nan_to_num(values, nan=-np.inf))
        rows = []
        for i in order:
            if np.isnan(values[i]):
                continue
            keep = context[i] >= 0
            focus = int(keep[: self.before].sum())
            tokens = [self.token_text[t] for t in context[i][keep].tolist()]
            rows.append(
                {
                    "value": float(values[i]),
                    "token": tokens[focus],
                    "context": tokens,
                    "context_acts": acts[i][keep].tolist(),
                    "focus": focus,
                }
            )
        return pd.DataFrame(rows, columns=["value", "token", "context", "context_acts", "focus"])

    def histogram(self, feature: int) -> pd.DataFrame:
        edges = self.bin_edges
        return pd.DataFrame({"left": edges[:-1], "right": edges[1:], "count": self.hist[feature]})

    def histogram_figure(self, feature: int) -> go.Figure:
        table = self.histogram(feature)
        fig = go.Figure(go.Bar(x=np.sqrt(table.left * table.right), y=table["count"], marker_color="#2166ac"))
        fig.update_xaxes(type="log", title="activation (where active)")
        fig.update_yaxes(title="tokens")
        title = f"feature {feature}: active on {self.frequency[feature]:.2%} of {self.n_tokens} tokens"
        fig.update_layout(title=title, height=260, margin=dict(t=40, b=40, l=50, r=20), bargap=0)
        return fig

    def table(self) -> pd.DataFrame:
        """Per latent: frequency, mean activation where active, top activation."""
        return pd.DataFrame(
            {
                "frequency": self.frequency,
                "mean_activation": self.mean_activation,
                "max_activation": self.top_values[:, 0],
            }
        ).rename_axis("feature")


def _stop_layer(hook_name: str, n_layers: int) -> int | None:
    match = _BLOCK.match(hook_name)
    if hook_name == "hook_embed":
        return 0
    if not match:
        return None
    stop = int(match.group(1)) + 1
    return stop if stop < n_layers else None


def feature_statistics(
    model: Any,
    sae: SparseAutoencoder,
    prompts: Sequence[str] | torch.Tensor,
    *,
    batch_size: int = 16,
    top_k: int = 8,
    before: int = 8,
    after: int = 2,
    bins: int = 60,
    value_range: tuple[float, float] = (1e-3, 1e3),
    skip_bos: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> FeatureStatistics:
    """Stream ``prompts`` through the model once and gather each latent's statistics (module docstring)."""
    name = sae.cfg.hook_name
    model.check_hook_name(name)
    tokens, mask = encode_prompts(model, prompts)
    acc = _Accumulator(sae.cfg.d_sae, top_k, before, after, bins, value_range, seed)
    stop = _stop_layer(name, model.cfg.n_layers)
    captured = {}

    def keep(activation, hook):
        captured["x"] = activation

    pairs = list(zip(batches(tokens, batch_size), batches(mask, batch_size)))
    for tok, msk in tqdm(pairs, desc="feature statistics", disable=not progress):
        with torch.no_grad():
            model.run_with_hooks(
                tok.to(model.cfg.device),
                attention_mask=msk.to(model.cfg.device),
                fwd_hooks=[(name, keep)],
                stop_at_layer=stop,
                return_type=None,
            )
            acts = sae.encode(captured.pop("x").to(sae.device)).float()
        valid = replaced_positions(msk, skip_bos)
        acc.add(tok, msk, valid, acts.cpu())
    token_text = model.vocabulary_labels()
    return acc.result(token_text)


class _Accumulator:
    def __init__(self, d_sae, k, before, after, bins, value_range, seed) -> None:
        self.k, self.before, self.after = k, before, after
        self.width = before + 1 + after
        self.count = torch.zeros(d_sae, dtype=torch.long)
        self.total = torch.zeros(d_sae, dtype=torch.float64)
        self.edges = torch.logspace(np.log10(value_range[0]), np.log10(value_range[1]), bins + 1)
        self.hist = torch.zeros(d_sae * bins, dtype=torch.long)
        self.bins = bins
        self.gen = torch.Generator().manual_seed(seed)
        self.n_tokens = 0
        self.slots = {
            which: {
                "key": torch.full((k, d_sae), -float("inf")),
                "value": torch.full((k, d_sae), float("nan")),
                "context": torch.full((k, d_sae, self.width), -1, dtype=torch.long),
                "acts": torch.zeros((k, d_sae, self.width)),
            }
            for which in ("top", "typical")
        }

    def add(self, tokens: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor, acts: torch.Tensor) -> None:
        b, pos, d_sae = acts.shape
        acts = acts * valid[..., None]
        flat = acts.reshape(b * pos, d_sae)
        on = flat > 0
        self.n_tokens += int(valid.sum())
        self.count += on.sum(0)
        self.total += flat.sum(0).double()
        rows, feats = on.nonzero(as_tuple=True)
        bucket = (torch.bucketize(flat[rows, feats], self.edges) - 1).clamp(0, self.bins - 1)
        self.hist.index_add_(0, feats * self.bins + bucket, torch.ones_like(bucket))
        # Context windows: token ids and the latent's activations, padded so every window fits.
        pad_tok = torch.nn.functional.pad(
            tokens.masked_fill(~mask.bool(), -1), (self.before, self.after), value=-1
        )
        pad_acts = torch.nn.functional.pad(acts, (0, 0, self.before, self.after))
        keys = {
            "top": flat,
            "typical": torch.where(on, torch.rand(flat.shape, generator=self.gen), -float("inf")),
        }
        for which, key in keys.items():
            key = key.masked_fill(~on, -float("inf"))
            n = min(self.k, len(key))
            cand_key, cand_row = key.topk(n, dim=0)  # [n, d_sae]
            self._merge(which, cand_key, cand_row, flat, pad_tok, pad_acts, pos)

    def _merge(self, which, cand_key, cand_row, flat, pad_tok, pad_acts, pos) -> None:
        slot = self.slots[which]
        d_sae = flat.shape[1]
        feat = torch.arange(d_sae).expand_as(cand_row)
        value = flat[cand_row, feat]
        value = torch.where(torch.isinf(cand_key), float("nan"), value)
        batch, position = cand_row // pos, cand_row % pos
        offsets = torch.arange(self.width)
        cols = position[..., None] + offsets  # [n, d_sae, C] into the padded sequence
        context = pad_tok[batch[..., None], cols]
        acts = pad_acts[batch[..., None], cols, feat[..., None]]
        keys = torch.cat([slot["key"], cand_key])
        best = keys.topk(self.k, dim=0).indices
        for part, new in (("key", cand_key), ("value", value), ("context", context), ("acts", acts)):
            both = torch.cat([slot[part], new])
            index = best if both.ndim == 2 else best[..., None].expand(-1, -1, both.shape[-1])
            slot[part] = both.gather(0, index)

    def result(self, token_text: list[str]) -> FeatureStatistics:
        count = self.count.numpy()
        arrays = {}
        for which, slot in self.slots.items():
            arrays[f"{which}_values"] = slot["value"].T.numpy()
            arrays[f"{which}_context"] = slot["context"].permute(1, 0, 2).numpy()
            arrays[f"{which}_context_acts"] = slot["acts"].permute(1, 0, 2).numpy()
        return FeatureStatistics(
            frequency=count / max(self.n_tokens, 1),
            mean_activation=(self.total.numpy() / np.maximum(count, 1)),
            bin_edges=self.edges.numpy(),
            hist=self.hist.reshape(-1, self.bins).numpy(),
            before=self.before,
            n_tokens=self.n_tokens,
            token_text=token_text,
            **arrays,
        )


# ---------------------------------------------------------------------------------- directions
def residual_direction(model: Any, sae: SparseAutoencoder, feature: int) -> torch.Tensor:
    """What one unit of the feature adds to the residual stream ``[d_model]``: its decoder row, mapped
    through ``W_out`` for an ``mlp.hook_post`` SAE and through ``W_O`` for an ``attn.hook_z`` SAE."""
    check_feature(sae, feature)
    row = sae.W_dec[feature].detach().float()
    name = sae.cfg.hook_name
    match = _BLOCK.match(name)
    if match and name.endswith("mlp.hook_post"):
        weight = model.hf_model.model.layers[int(match.group(1))].mlp.down_proj.weight
        return weight.float() @ row.to(weight.device)
    if match and name.endswith("attn.hook_z"):
        weight = model.hf_model.model.layers[int(match.group(1))].self_attn.o_proj.weight
        return weight.float() @ row.to(weight.device)
    if row.shape[0] != model.cfg.d_model:
        raise ValueError(f"Cannot map a {name} feature into the residual stream; use a residual-stream SAE.")
    return row


def feature_output_tokens(
    model: Any, sae: SparseAutoencoder, feature: int, k: int = 10, chunk: int = 16_384
) -> pd.DataFrame:
    """The tokens the feature's direction promotes and suppresses: ``direction x final-norm weight @ W_U``
    (the norm's scale is positive per token, so it leaves the ranking alone), over vocabulary chunks."""
    direction = residual_direction(model, sae, feature)
    weight = model.hf_model.model.norm.weight
    direction = (direction.to(weight.device) * weight.float()).to(model.W_U.device)
    vocab = model.W_U.shape[1]
    best = {"promoted": (torch.empty(0), torch.empty(0, dtype=torch.long)), "suppressed": None}
    best["suppressed"] = best["promoted"]
    for start in range(0, vocab, chunk):
        scores = (direction @ model.W_U[:, start : start + chunk].float()).cpu()
        ids = torch.arange(start, start + len(scores))
        for kind, sign in (("promoted", 1), ("suppressed", -1)):
            values = torch.cat([best[kind][0], sign * scores])
            index = torch.cat([best[kind][1], ids])
            top = values.topk(min(k, len(values)))
            best[kind] = (top.values, index[top.indices])
    rows = []
    for kind, sign in (("promoted", 1), ("suppressed", -1)):
        values, ids = best[kind]
        texts = model.token_labels(ids.tolist())
        for rank, (value, token, text) in enumerate(zip(values.tolist(), ids.tolist(), texts)):
            rows.append({"kind": kind, "rank": rank, "token": text, "token_id": token, "logit": sign * value})
    return pd.DataFrame(rows)


def nearest_features(sae: SparseAutoencoder, feature: int, k: int = 10) -> pd.DataFrame:
    """The ``k`` other latents whose decoder directions are closest to this one's (cosine)."""
    check_feature(sae, feature)
    dirs = sae.feature_directions()
    cos = dirs @ dirs[feature]
    cos[feature] = -float("inf")
    top = cos.topk(min(k, len(cos) - 1))
    return pd.DataFrame({"feature": top.indices.tolist(), "cosine": top.values.tolist()})
