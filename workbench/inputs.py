"""What the model accepts as input: texts tokenised and padded by one rule, token ids and masks checked.

Every analysis tokenises through the model (`model.tokenize`, `model.to_tokens`), so the padding rule, the
pad id and the BOS rule live here once; so do the batching of prompts (`batches`) and the rule for each row's
last real token (`last_token_index`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Input = str | Sequence[str] | torch.Tensor

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16)


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else 0. Padded positions are masked,
    so the choice never changes a real token's activations; it only has to be a valid id."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def tokenize(
    tokenizer: Any, input: str | Sequence[str], prepend_bos: bool = True, padding_side: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a 0/1 mask, both [batch, pos] long: BOS first when the tokenizer has one (Apertus is
    trained so); a list of texts is padded on `padding_side` (default: the tokenizer's)."""
    texts = [input] if isinstance(input, str) else input
    if not isinstance(texts, Sequence) or not texts:
        raise ValueError("No prompt given: pass a text, a non-empty list of texts, or a tensor of token ids.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"Prompt {i} is a {type(text).__name__}, not a str.")
        if not text:
            raise ValueError(f"Prompt {i} is empty: give it at least one character.")
    encoded = [tokenizer(text, add_special_tokens=prepend_bos)["input_ids"] for text in texts]
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is not None:
        encoded = [ids if ids[:1] == [bos] else [bos, *ids] for ids in encoded]
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {side!r}.")
    return pad(encoded, pad_token_id(tokenizer), left=side == "left")


def pad(
    sequences: Sequence[Sequence[int]], pad_id: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack id lists into [batch, width] ids and a 0/1 mask, padding on the left or right."""
    width = max(len(ids) for ids in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        tokens[row, span] = torch.as_tensor(list(ids), dtype=torch.long)
        mask[row, span] = 1
    return tokens, mask


def as_token_tensor(input: Any) -> torch.Tensor:
    """A [batch, pos] integer tensor from a token tensor, or a clear error for anything else."""
    if input is None:
        raise TypeError("No input: pass a text, a list of texts, or a tensor of token ids.")
    if not isinstance(input, torch.Tensor):
        raise TypeError(
            f"Input of type {type(input).__name__} is not accepted: pass a text, a list of texts, or a torch "
            "tensor of token ids (convert arrays with torch.as_tensor(ids, dtype=torch.long))."
        )
    tokens = input[None] if input.ndim == 1 else input
    if tokens.ndim != 2:
        raise ValueError(f"Token ids must be [batch, pos] or [pos]; got shape {tuple(input.shape)}.")
    if tokens.dtype not in _INTEGER_DTYPES:
        raise TypeError(
            f"Token ids must be an integer tensor (int64); got dtype {tokens.dtype}. A float or bool tensor "
            "is not a list of token ids: use model.to_tokens(text), or .long() on ids you made yourself."
        )
    return tokens


def check_tokens(tokens: torch.Tensor, d_vocab: int, n_ctx: int) -> None:
    """Refuse empty inputs, inputs longer than the context, and ids outside the vocabulary."""
    if tokens.numel() == 0:
        raise ValueError(
            f"Empty prompt (token tensor of shape {tuple(tokens.shape)}): give at least one token."
        )
    if tokens.shape[1] > n_ctx:
        raise ValueError(
            f"The prompt has {tokens.shape[1]} tokens but the model's context is {n_ctx} "
            "(max_position_embeddings): shorten it or split it into windows."
        )
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= d_vocab:
        bad = low if low < 0 else high
        raise ValueError(
            f"Token id {bad} is outside the vocabulary (0..{d_vocab - 1}): were these ids made by another "
            "model's tokenizer? Use model.to_tokens(text)."
        )


def check_attention_mask(mask: Any, shape: tuple[int, int]) -> torch.Tensor | None:
    """A boolean key mask [batch, keys], or None when nothing is masked. `shape` is (batch, keys)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch tensor of 0/1 entries, not a {type(mask).__name__}.")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but the input needs {tuple(shape)} "
            "(one 0/1 entry per token, [batch, pos], covering cached positions too when there are any)."
        )
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            bad = ~((mask == 0) | (mask == 1))
        else:
            bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise ValueError(
                f"attention_mask holds values other than 0 and 1 (e.g. {mask[bad][0].item()!r}): it marks "
                "real tokens with 1 and padding with 0; it is not a weighting."
            )
    mask = mask.bool()
    empty = (~mask.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"attention_mask rows {empty} are all zero: every prompt needs at least one real token."
        )
    return None if bool(mask.all()) else mask


def batches(items: Any, size: int) -> list:
    """`items` (a list, a tensor along its first axis, or a `range` of indices) cut into consecutive slices
    of `size`, the last one shorter when `size` does not divide it; each slice has the type of `items`.

    size: items per batch, a positive integer.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"batch_size must be a positive integer, not {size!r}.")
    return [items[start : start + size] for start in range(0, len(items), size)]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's last real token: the last position the 0/1 mask [batch, pos] marks, whichever side the
    padding is on ([batch] long, on the mask's device)."""
    mask = attention_mask.long()
    return (torch.arange(mask.shape[-1], device=mask.device) * mask).argmax(-1)
