"""The few engine calls the multilingual analyses share, all on the engine's public surface."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.names import act_name, resid_labels, resid_names

__all__ = ["act_name", "ln_final", "resid_labels", "resid_names", "tokenize", "unembed"]


def ln_final(model, resid: torch.Tensor) -> torch.Tensor:
    """The final RMSNorm (with its weight) applied to ``resid`` with its own scale: the logit lens."""
    return model.ln_final(resid)


def unembed(model, normed: torch.Tensor) -> torch.Tensor:
    """Logits from a normalised residual stream (the model's own output head)."""
    return model.unembed(normed)


def tokenize(model, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(tokens [b, pos], mask [b, pos])`` with BOS first (the engine's padding rule), so
    that each text's last token is at ``workbench.inputs.last_token_index(mask)``."""
    return model.tokenize(list(texts), padding_side="right")
