"""Prompt pairs and answers, checked: equal token lengths, single-token answers, one per prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workbench.hooked_model import HookedApertus
from workbench.inputs import last_token_index
from workbench.patching.components import Prompts


@dataclass
class PromptPairs:
    """Checked clean/corrupted token pairs, their padding mask, each prompt's last real token and answers."""

    clean: torch.Tensor  # [prompts, pos]
    corrupted: torch.Tensor
    mask: torch.Tensor | None  # None when nothing is padded
    last: torch.Tensor  # [prompts]: each prompt's last real token
    answer_ids: torch.Tensor | None
    wrong_ids: torch.Tensor | None
    str_tokens: list[str]  # the first clean prompt's tokens

    @classmethod
    def build(cls, model: HookedApertus, clean: Prompts, corrupted: Prompts, answers: Any, attention_mask):
        a, b, mask = pair_tokens(model, clean, corrupted, attention_mask)
        answer_ids, wrong_ids = parse_answers(model, answers, a.shape[0])
        return cls(a, b, mask, last_positions(a, mask), answer_ids, wrong_ids, str_tokens(model, a[0]))

    @property
    def n_prompts(self) -> int:
        return self.clean.shape[0]

    @property
    def n_pos(self) -> int:
        return self.clean.shape[1]

    def tokens(self, run: str) -> torch.Tensor:
        return self.clean if run == "clean" else self.corrupted


def last_positions(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each prompt's last real token: the last position, or the last the mask marks."""
    n, n_pos = tokens.shape
    if mask is None:
        return torch.full((n,), n_pos - 1, dtype=torch.long, device=tokens.device)
    return last_token_index(mask)


def str_tokens(model: HookedApertus, ids: torch.Tensor) -> list[str]:
    if model.tokenizer is None:  # a token-only model (random_apertus without a tokenizer)
        return [str(int(i)) for i in ids]
    return model.token_labels(ids.flatten())


def pair_tokens(model: HookedApertus, clean: Prompts, corrupted: Prompts, attention_mask):
    if isinstance(clean, torch.Tensor) != isinstance(corrupted, torch.Tensor):
        raise TypeError("Pass clean and corrupted both as texts or both as token tensors.")
    if isinstance(clean, torch.Tensor):
        a = clean[None] if clean.ndim == 1 else clean
        b = corrupted[None] if corrupted.ndim == 1 else corrupted
        if a.shape != b.shape:
            raise ValueError(
                f"Clean tokens have shape {tuple(a.shape)} but corrupted {tuple(b.shape)}: patching needs "
                f"pairs of equal length.\n  clean:     {str_tokens(model, a[0])}"
                f"\n  corrupted: {str_tokens(model, b[0])}"
            )
        device = model.W_E.device
        mask = (
            None if attention_mask is None or bool(attention_mask.all()) else attention_mask.to(device).long()
        )
        model.check_tokens(a)
        model.check_tokens(b)
        return a.to(device), b.to(device), mask
    clean = [clean] if isinstance(clean, str) else list(clean)
    corrupted = [corrupted] if isinstance(corrupted, str) else list(corrupted)
    if len(clean) != len(corrupted):
        raise ValueError(
            f"{len(clean)} clean prompts but {len(corrupted)} corrupted ones: give one corrupted per clean."
        )
    for i, (x, y) in enumerate(zip(clean, corrupted)):
        sx, sy = model.to_str_tokens(x), model.to_str_tokens(y)
        if len(sx) != len(sy):
            raise ValueError(
                f"Pair {i}: the clean prompt has {len(sx)} tokens but the corrupted one {len(sy)}; patching "
                f"copies activations position by position, so both must tokenise to the same length.\n"
                f"  clean:     {sx}\n  corrupted: {sy}"
            )
    a, mask = model.tokenize(clean)
    b, _ = model.tokenize(corrupted)
    device = model.W_E.device
    mask = None if bool(mask.all()) else mask.to(device)
    return a.to(device), b.to(device), mask


def parse_answers(
    model: HookedApertus, answers: Any, n: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(correct [n], wrong [n] or None) from a pair, a single answer, one per prompt, or an id tensor."""
    if answers is None:
        return None, None
    device = model.W_E.device
    if isinstance(answers, torch.Tensor):
        if answers.dtype.is_floating_point or answers.dtype.is_complex or answers.dtype == torch.bool:
            raise TypeError(
                f"answers is a {answers.dtype} tensor: token ids must be integers (torch.long), e.g. "
                "torch.tensor([[correct_id, wrong_id]]), or give the answers as texts (' Mary', ' John')."
            )
        ids = answers.long().reshape(-1, answers.shape[-1]) if answers.ndim else answers.long().view(1, 1)
    else:
        if not isinstance(answers, (str, int, tuple, list)):
            raise TypeError(
                f"answers is a {type(answers).__name__}: give a pair (correct, wrong) of texts or ids, one "
                "pair per prompt, or a tensor of integer ids."
            )
        items = [answers] if isinstance(answers, str | int) or _is_pair(answers) else list(answers)
        rows = [list(item) if isinstance(item, tuple | list) else [item] for item in items]
        ids = torch.tensor(
            [[_token_id(model, t, i) for t in row] for i, row in enumerate(rows)], dtype=torch.long
        )
    if ids.shape[0] == 1:
        ids = ids.expand(n, -1)
    if ids.shape[0] != n or ids.shape[1] not in (1, 2):
        raise ValueError(
            f"answers has shape {tuple(ids.shape)}: give one tuple (correct, wrong) for all prompts, or a "
            f"list with one tuple (or one answer) per prompt ({n} prompts)."
        )
    ids = ids.to(device)
    if int(ids.min()) < 0 or int(ids.max()) >= model.cfg.d_vocab:
        raise ValueError(f"An answer id is outside the vocabulary (0..{model.cfg.d_vocab - 1}).")
    return ids[:, 0].contiguous(), ids[:, 1].contiguous() if ids.shape[1] == 2 else None


def _is_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and all(isinstance(t, str | int) for t in x)


def _token_id(model: HookedApertus, token: str | int, prompt: int) -> int:
    if isinstance(token, bool) or not isinstance(token, (str, int)):
        raise TypeError(
            f"Answer of prompt {prompt} is {token!r} ({type(token).__name__}): give a single-token text such "
            f"as ' Mary' or an integer token id in 0..{model.cfg.d_vocab - 1}."
        )
    if isinstance(token, int):
        return token
    try:
        return model.to_single_token(token)  # refuses texts that become the unknown token, by name
    except ValueError as error:
        raise ValueError(f"Answer of prompt {prompt}: {error} Answers must be known single tokens.") from None
