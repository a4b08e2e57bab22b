"""Measure the abilities of a causal LM on the corpus tasks with known ground truth.

The functions take a plain ``transformers`` causal LM (e.g. ``AutoModelForCausalLM.from_pretrained``) and its
tokenizer and return plain numbers or pandas DataFrames. Head scores are the attention analysis's own
(:func:`workbench.attention.head_scores`, on the model wrapped without copying a weight), so the card's
induction score and the notebooks' are one definition. The training script writes :func:`measure_abilities`
into the model card, and the tests recompute it with the same arguments, so card and tests agree by
construction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pandas as pd
import torch

from workbench.attention import head_scores
from workbench.data.corpus import EVAL_SEED, IOIPrompt, encode_ioi, ioi_prompts, repeated_token_ids
from workbench.hooked_model import HookedApertus
from workbench.inputs import batches

#: Sample sizes of the model card's figures (with :data:`workbench.data.corpus.EVAL_SEED`).
CARD_IOI_PROMPTS = 512
CARD_INDUCTION_SEQUENCES = 128
CARD_INDUCTION_LENGTH = 32


@contextmanager
def _eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def ioi_table(model, tokenizer, prompts: Sequence[IOIPrompt], *, batch_size: int = 128) -> pd.DataFrame:
    """One row per prompt: logits of the answer and the distractor at the final position of the clean prompt.

    Columns: ``clean``, ``answer``, ``wrong``, ``template``, ``order``, ``answer_logit``, ``wrong_logit``,
    ``logit_diff`` (answer minus wrong), ``top1`` (the predicted token, decoded like ``answer``) and
    ``correct`` (top-1 is the answer).
    """
    rows = []
    with _eval_mode(model):
        for chunk in batches(list(prompts), batch_size):
            batch = encode_ioi(chunk, tokenizer)
            device = _device(model)
            logits = model(
                input_ids=batch.clean_ids.to(device), attention_mask=batch.attention_mask.to(device)
            ).logits.float()
            final = logits[torch.arange(len(chunk)), batch.last.to(device)]
            answer_logit = final.gather(1, batch.answer_ids.to(device)[:, None])[:, 0]
            wrong_logit = final.gather(1, batch.wrong_ids.to(device)[:, None])[:, 0]
            top1 = final.argmax(-1).cpu()
            for i, p in enumerate(chunk):
                rows.append(
                    {
                        "clean": p.clean,
                        "answer": p.answer,
                        "wrong": p.wrong,
                        "template": p.template,
                        "order": p.order,
                        "answer_logit": answer_logit[i].item(),
                        "wrong_logit": wrong_logit[i].item(),
                        "logit_diff": (answer_logit[i] - wrong_logit[i]).item(),
                        "top1": tokenizer.decode([int(top1[i])]),
                        "correct": bool(top1[i] == batch.answer_ids[i]),
                    }
                )
    return pd.DataFrame(rows)


def ioi_accuracy(model, tokenizer, prompts: Sequence[IOIPrompt]) -> float:
    """Fraction of prompts whose top-1 next token (over the whole vocabulary) is the indirect object."""
    return float(ioi_table(model, tokenizer, prompts)["correct"].mean())


def ioi_logit_diff(model, tokenizer, prompts: Sequence[IOIPrompt]) -> float:
    """Mean logit difference, indirect object minus subject, at the final position."""
    return float(ioi_table(model, tokenizer, prompts)["logit_diff"].mean())


def _split_copies(tokens: torch.Tensor, length: int) -> int:
    prefix = tokens.shape[1] % length
    if tokens.shape[1] - prefix < 2 * length:
        raise ValueError(f"tokens of width {tokens.shape[1]} hold fewer than two copies of length {length}")
    return prefix


def induction_accuracy(model, tokens: torch.Tensor, length: int, *, batch_size: int = 64) -> float:
    """Top-1 accuracy on every copy after the first of repeated random sequences.

    tokens: ``[n, prefix + repeats*length]`` as from :func:`workbench.data.corpus.repeated_token_ids`
    (``prefix`` is 1 with BOS). The first token of each later copy is not counted: nothing announces that
    a repeat begins, so only the following ``length - 1`` tokens of each copy are predictable.
    """
    prefix = _split_copies(tokens, length)
    width = tokens.shape[1]
    # Positions whose next token lies in a later copy, excluding that copy's first token.
    positions = [p for p in range(prefix + length, width - 1) if (p + 1 - prefix) % length != 0]
    pos = torch.tensor(positions)
    hits = total = 0
    with _eval_mode(model):
        for chunk in batches(tokens, batch_size):
            chunk = chunk.to(_device(model))
            logits = model(input_ids=chunk).logits
            pred = logits[:, pos].argmax(-1)
            hits += (pred == chunk[:, pos + 1]).sum().item()
            total += pred.numel()
    return hits / total


def induction_scores(model, tokens: torch.Tensor, length: int) -> pd.DataFrame:
    """Induction score of every head: mean attention from each token of a later copy to the token that
    followed its previous occurrence (offset ``length - 1`` back). Index: layer; columns: head.

    The ``induction`` column of :func:`workbench.attention.head_scores`: on repeated sequences of distinct
    tokens (``repeated_token_ids``) each later-copy token's only target is that offset.
    """
    _split_copies(tokens, length)
    return _head_score_grid(model, tokens, "induction")


def previous_token_scores(model, tokens: torch.Tensor) -> pd.DataFrame:
    """Mean attention of every head from each token (after the first) to the token just before it.

    The ``previous_token`` column of :func:`workbench.attention.head_scores`. Index: layer; columns: head.
    """
    return _head_score_grid(model, tokens, "previous_token")


def _head_score_grid(model, tokens: torch.Tensor, score: str) -> pd.DataFrame:
    with _eval_mode(model):
        # No tokenizer: the scores read token ids only. The wrapper holds the model's modules, copying none.
        table = head_scores(HookedApertus(model, None), tokens, progress=False)
    grid = table[score].unstack("head")
    grid.index = pd.RangeIndex(len(grid), name="layer")
    grid.columns = pd.RangeIndex(grid.shape[1], name="head")
    return grid


def measure_abilities(
    model,
    tokenizer,
    *,
    seed: int = EVAL_SEED,
    n_ioi: int = CARD_IOI_PROMPTS,
    n_induction: int = CARD_INDUCTION_SEQUENCES,
    induction_length: int = CARD_INDUCTION_LENGTH,
) -> dict[str, float | int]:
    """The model card's figures, on freshly generated held-out samples.

    IOI: ``ioi_prompts(n_ioi, seed, split="heldout")`` (name pairs never seen together in training).
    Induction: ``repeated_token_ids(tokenizer, n_induction, induction_length, seed)``, two copies after BOS.
    Returns ``ioi_accuracy``, ``ioi_logit_diff``, ``induction_accuracy``, ``max_induction_score`` and
    where that maximum is, ``best_induction_layer`` and ``best_induction_head``.
    """
    table = ioi_table(model, tokenizer, ioi_prompts(n_ioi, seed, split="heldout"))
    tokens = repeated_token_ids(tokenizer, n_induction, induction_length, seed)
    scores = induction_scores(model, tokens, induction_length)
    stacked = scores.stack()
    layer, head = stacked.idxmax()
    return {
        "ioi_accuracy": float(table["correct"].mean()),
        "ioi_logit_diff": float(table["logit_diff"].mean()),
        "induction_accuracy": induction_accuracy(model, tokens, induction_length),
        "max_induction_score": float(stacked.max()),
        "best_induction_layer": int(layer),
        "best_induction_head": int(head),
    }
