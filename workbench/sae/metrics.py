"""How good a spliced SAE is: reconstruction, sparsity, and the next-token loss it costs the model.

:func:`evaluate_saes` runs a set of prompts through the model twice per SAE and returns one row per hook
point with

- ``mse`` (per element) and ``explained_variance`` (1 - sum of squared errors / sum of squared deviations
  from the mean activation) of the reconstruction,
- ``l0`` (active latents per token), ``dead`` (share of latents never active on these prompts) and
  ``dense`` (share active on more than ``dense_threshold`` of the tokens),
- next-token cross-entropy of the model as it is (``ce_clean``), with the SAE's reconstruction in place of
  the activation (``ce_sae``), with the activation zeroed (``ce_zero``) and replaced by its mean over the
  prompts (``ce_mean``), and ``loss_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)`` (likewise
  ``loss_recovered_vs_mean``).

The activation is replaced at every real token except the first of each prompt (BOS, whose outsized
residual stream SAEs are not trained on; ``skip_bos=False`` to include it), and the cross-entropy is
averaged over the predictions made at those positions (the others cannot change) whose next token is real.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench import inputs
from workbench.sae.model import SparseAutoencoder

__all__ = ["encode_prompts", "evaluate_saes", "replaced_positions"]


def encode_prompts(model: Any, prompts: Sequence[str] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a 0/1 mask ``[n, pos]`` for texts (right-padded) or a tensor of ids (mask all ones)."""
    if isinstance(prompts, torch.Tensor):
        tokens = prompts[None] if prompts.ndim == 1 else prompts
        return tokens.long(), torch.ones_like(tokens, dtype=torch.long)
    if isinstance(prompts, str):
        raise TypeError("prompts is a single str: pass a list of texts (e.g. [text]).")
    if hasattr(model, "tokenize"):
        return model.tokenize(list(prompts), padding_side="right")
    rows = [model.to_tokens(text)[0].cpu() for text in prompts]
    pad = model.tokenizer.pad_token_id
    pad = pad if pad is not None else (model.tokenizer.eos_token_id or 0)
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, : len(row)], mask[i, : len(row)] = row, 1
    return tokens, mask


def replaced_positions(mask: torch.Tensor, skip_bos: bool = True) -> torch.Tensor:
    """Boolean ``[n, pos]``: the real tokens whose activation an evaluation replaces."""
    where = mask.bool().clone()
    if skip_bos:
        first = where.long().argmax(1)
        where[torch.arange(len(where)), first] = False
    return where


def _next_token_ce(logits: torch.Tensor, tokens: torch.Tensor, where: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy of the predictions made at ``where`` and their count."""
    pick = where[:, :-1]
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    ce = ce.reshape(pick.shape)
    return float(ce[pick].sum()), int(pick.sum())


def evaluate_saes(
    model: Any,
    saes: SparseAutoencoder | Sequence[SparseAutoencoder],
    prompts: Sequence[str] | torch.Tensor,
    *,
    batch_size: int = 16,
    skip_bos: bool = True,
    dense_threshold: float = 0.1,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per SAE (indexed by hook name); see the module docstring for the columns."""
    saes = [saes] if isinstance(saes, SparseAutoencoder) else list(saes)
    tokens, mask = encode_prompts(model, prompts)
    device = model.cfg.device
    # Predictions are scored only where the next token is real too.
    targets_ok = torch.cat([mask[:, 1:].bool(), torch.zeros_like(mask[:, :1], dtype=torch.bool)], 1)
    where_all = replaced_positions(mask, skip_bos)
    scored_all = where_all & targets_ok
    batches = [slice(r.start, r.stop) for r in inputs.batches(range(len(tokens)), batch_size)]
    rows = []
    bar = tqdm(total=len(saes) * len(batches) * 2, desc="evaluate SAEs", disable=not progress)
    for sae in saes:
        name = sae.cfg.hook_name
        model.check_hook_name(name)
        stats = _Stats(sae.cfg.d_sae)
        ce = {"clean": [0.0, 0], "sae": [0.0, 0], "zero": [0.0, 0]}
        for b in batches:
            tok, msk, where = tokens[b].to(device), mask[b].to(device), where_all[b].to(device)
            scored = scored_all[b].to(device)
            logits, cache = model.run_with_cache(tok, attention_mask=msk, names_filter=[name])
            x = cache[name][where]
            with torch.no_grad():
                acts = sae.encode(x.to(sae.device))
                recon = sae.unflatten(sae.decode(acts), x)
            stats.add(x.float(), recon.float().to(x.device), acts)
            _add(ce["clean"], _next_token_ce(logits, tok, scored))
            for kind in ("sae", "zero"):
                hook = _replace(sae, where, kind)
                out = model.run_with_hooks(tok, attention_mask=msk, fwd_hooks=[(name, hook)])
                _add(ce[kind], _next_token_ce(out, tok, scored))
            bar.update()
        mean = stats.mean()
        ce["mean"] = [0.0, 0]
        for b in batches:
            tok, msk, where = tokens[b].to(device), mask[b].to(device), where_all[b].to(device)
            scored = scored_all[b].to(device)
            out = model.run_with_hooks(
                tok, attention_mask=msk, fwd_hooks=[(name, _replace(sae, where, "mean", mean))]
            )
            _add(ce["mean"], _next_token_ce(out, tok, scored))
            bar.update()
        losses = {kind: total / max(n, 1) for kind, (total, n) in ce.items()}
        rows.append(
            {
                "hook": name,
                "architecture": sae.cfg.architecture,
                "d_sae": sae.cfg.d_sae,
                **stats.summary(dense_threshold),
                **{f"ce_{k}": v for k, v in losses.items()},
                "loss_recovered": _recovered(losses, "zero"),
                "loss_recovered_vs_mean": _recovered(losses, "mean"),
            }
        )
    bar.close()
    return pd.DataFrame(rows).set_index("hook")


def _recovered(losses: dict, baseline: str) -> float:
    return (losses[baseline] - losses["sae"]) / (losses[baseline] - losses["clean"])


def _add(acc: list, value: tuple[float, int]) -> None:
    acc[0] += value[0]
    acc[1] += value[1]


def _replace(sae: SparseAutoencoder, where: torch.Tensor, kind: str, mean: torch.Tensor | None = None):
    def hook(activation: torch.Tensor, hook) -> torch.Tensor:
        x = activation[where]
        if kind == "sae":
            with torch.no_grad():
                new = sae(x.to(sae.device)).to(x.device, x.dtype)
        elif kind == "zero":
            new = torch.zeros_like(x)
        else:
            new = mean.to(x.device, x.dtype).expand_as(x)
        activation = activation.clone()
        activation[where] = new
        return activation

    return hook


class _Stats:
    """Running sums for the reconstruction and sparsity columns."""

    def __init__(self, d_sae: int) -> None:
        self.n, self.sum_x, self.sum_xx, self.sum_err = 0, None, 0.0, 0.0
        self.active = torch.zeros(d_sae, dtype=torch.long)
        self.l0 = 0.0
        self.width = 1

    def add(self, x: torch.Tensor, recon: torch.Tensor, acts: torch.Tensor) -> None:
        flat = x.reshape(len(x), -1).double()
        self.width = flat.shape[1]
        self.n += len(flat)
        self.sum_x = flat.sum(0) if self.sum_x is None else self.sum_x + flat.sum(0)
        self.sum_xx += float(flat.pow(2).sum())
        self.sum_err += float((flat - recon.reshape(len(x), -1).double()).pow(2).sum())
        on = acts > 0
        self.active += on.sum(0).cpu()
        self.l0 += float(on.sum())
        self.shape = x.shape[1:]

    def mean(self) -> torch.Tensor:
        return (self.sum_x / self.n).float().reshape(self.shape)

    def summary(self, dense_threshold: float) -> dict:
        variance = self.sum_xx - float(self.sum_x.pow(2).sum()) / self.n
        freq = self.active.double() / self.n
        return {
            "n_tokens": self.n,
            "mse": self.sum_err / (self.n * self.width),
            "explained_variance": 1 - self.sum_err / variance,
            "l0": self.l0 / self.n,
            "dead": float((self.active == 0).double().mean()),
            "dense": float((freq > dense_threshold).double().mean()),
        }
