"""Answers must be words the tokenizer knows: a word that becomes the unknown token is refused, by name.

A word-level tokenizer (such as the shipped one) maps every word it lacks to ``<unk>``, which is a single
token, so ``to_single_token`` accepts it; a logit difference or a lens trajectory "for" that word would then
be the one of every unknown word. :func:`check_known` refuses it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_known"]


def check_known(model: Any, text: str, token_id: int) -> None:
    """Raise ValueError naming ``text`` when the tokenizer turned it into its unknown token."""
    tokenizer = model.tokenizer
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and token_id == unk and text.strip() != tokenizer.unk_token:
        raise ValueError(
            f"{text!r} is not in the tokenizer's vocabulary: it becomes the unknown token "
            f"{tokenizer.unk_token!r} (id {unk}), so a score for it would be the score of every unknown "
            "word. Choose a word the tokenizer knows (model.to_str_tokens(text) shows how a text splits)."
        )
