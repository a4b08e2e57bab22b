"""The few engine calls the multilingual analyses need, written against the engine's public surface.

The lead is landing ``workbench.names`` (hook names), ``model.tokenize`` (the padding rule),
``model.ln_final`` (one argument) and ``model.unembed``; until they are on every branch these helpers fall
back to the equivalent public calls that exist today (``transformer_lens.utils.get_act_name``,
``workbench.lens``), so the analyses give the same numbers either way.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from workbench import lens

try:  # pragma: no cover - depends on which engine version is installed
    from workbench.names import act_name
except ImportError:  # pragma: no cover
    from transformer_lens.utils import get_act_name as act_name

__all__ = ["act_name", "ln_final", "resid_labels", "resid_names", "tokenize", "unembed"]


def resid_names(n_layers: int) -> list[str]:
    """Residual stream 0..n_layers: ``blocks.{i}.hook_resid_pre`` for i < n_layers, then the final
    ``blocks.{n-1}.hook_resid_post`` (the contract's one numbering of the stream)."""
    return [act_name("resid_pre", i) for i in range(n_layers)] + [act_name("resid_post", n_layers - 1)]


def resid_labels(n_layers: int) -> list[str]:
    """TransformerLens's accumulated_resid labels of :func:`resid_names`: "0_pre", ..., "final_post"."""
    return [f"{i}_pre" for i in range(n_layers)] + ["final_post"]


def ln_final(model, resid: torch.Tensor) -> torch.Tensor:
    """The final RMSNorm (with its weight) applied to ``resid`` with its own scale."""
    norm = getattr(model, "ln_final", None)
    if callable(norm):
        # Today's hook module takes (x, norm); the lead's public ln_final takes x alone.
        signature = inspect.signature(norm.forward if isinstance(norm, torch.nn.Module) else norm)
        if len(signature.parameters) == 1:
            return norm(resid)
    return lens.final_norm(model, resid)


def unembed(model, normed: torch.Tensor) -> torch.Tensor:
    """Logits from a normalised residual stream (the model's own output head)."""
    if callable(getattr(model, "unembed", None)):
        return model.unembed(normed)
    return lens.unembed(model, normed)


def pad_id(tokenizer) -> int:
    """The padding rule: pad_token_id, else eos_token_id, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def tokenize(model, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(tokens [b, pos], mask [b, pos])`` with BOS first, as ``model.tokenize`` does."""
    if callable(getattr(model, "tokenize", None)):
        return model.tokenize(list(texts), padding_side="right")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise ValueError("Give a non-empty list of non-empty texts.")
    bos = model.tokenizer.bos_token_id
    rows = []
    for text in texts:
        ids = model.tokenizer(text, add_special_tokens=True)["input_ids"]
        rows.append(ids if bos is None or ids[:1] == [bos] else [bos, *ids])
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id(model.tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return tokens, mask


def batches(n: int, batch_size: int):
    """Index ranges ``range(start, stop)`` covering ``n`` items ``batch_size`` at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}.")
    return [range(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
