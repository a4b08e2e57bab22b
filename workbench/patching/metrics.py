"""The built-in metrics and callables, evaluated per prompt pair for stacked variants."""

from __future__ import annotations

import difflib
from typing import Any

import torch

from workbench.inputs import batches
from workbench.patching.components import METRICS, Metric
from workbench.patching.inputs import PromptPairs
from workbench.patching.runs import ReferenceRuns


def check_metric(metric: Metric, pairs: PromptPairs) -> Metric:
    if callable(metric):
        return metric
    if metric not in METRICS:
        close = difflib.get_close_matches(str(metric), METRICS, n=1, cutoff=0.3)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown metric {metric!r}: use one of {', '.join(METRICS)} or a callable on logits.{hint}"
        )
    if metric in ("logit_diff", "answer_prob") and pairs.answer_ids is None:
        raise ValueError(
            f"The {metric!r} metric needs answers=(correct, wrong), e.g. answers=(' Mary', ' John')."
        )
    if metric == "logit_diff" and pairs.wrong_ids is None:
        raise ValueError("The 'logit_diff' metric needs a wrong answer too: answers=(correct, wrong).")
    return metric


def metric_name(metric: Metric) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")


def per_pair_values(metric: Metric, logits: torch.Tensor, full: bool, runs: ReferenceRuns) -> torch.Tensor:
    """The metric of each variant and prompt pair, float64 [variants, prompts], for logits of
    n_variants x n_prompts rows (variant-major; last-token [rows, vocab], or full when `full`). Keeps the
    autograd graph (attribution differentiates it).

    A callable that returns one scalar per batch gives [variants, 1]: no per-pair values exist then.
    """
    pairs = runs.pairs
    b = pairs.n_prompts
    if callable(metric):
        values = []
        for variant in batches(logits, b):
            value = metric_value(metric(variant))
            if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != b):
                raise ValueError(
                    f"The metric returned shape {tuple(value.shape)}: return a scalar or one value per "
                    f"prompt ([{b}]) from logits [prompts, pos, vocab]."
                )
            values.append(value.reshape(-1))
        return torch.stack(values)
    rows = torch.arange(logits.shape[0], device=logits.device) % b
    last = logits[torch.arange(logits.shape[0], device=logits.device), pairs.last[rows]] if full else logits
    last = last.to(torch.promote_types(last.dtype, torch.float32))
    if metric == "logit_diff":
        answer, wrong = pairs.answer_ids[rows, None], pairs.wrong_ids[rows, None]
        per_row = last.gather(1, answer) - last.gather(1, wrong)
    elif metric == "answer_prob":
        per_row = last.softmax(-1).gather(1, pairs.answer_ids[rows, None])
    else:  # KL(clean || patched) at the last token
        # In float64: near the clean run KL is a small difference of large sums.
        clean = runs.clean_last_log_probs()[rows]
        per_row = (clean.exp() * (clean - last.double().log_softmax(-1))).sum(-1)
    return per_row.view(-1, b).double()


def metric_values(metric: Metric, logits: torch.Tensor, full: bool, runs: ReferenceRuns) -> torch.Tensor:
    """The metric of each variant (the mean over prompt pairs); differentiable, for attribution."""
    return per_pair_values(metric, logits, full, runs).mean(1)


def metric_value(value: Any) -> torch.Tensor:
    """A custom metric's return value as float64, refused when it is not a finite number (or numbers)."""
    if (
        isinstance(value, str)
        or not isinstance(value, (int, float, torch.Tensor))
        and not hasattr(value, "__array__")
    ):
        raise TypeError(
            f"The metric returned {type(value).__name__} {value!r:.60}: return a number or a tensor (a "
            "scalar or one value per prompt) computed from the logits."
        )
    value = torch.as_tensor(value, dtype=torch.float64)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(
            f"The metric returned {value.tolist()}: not a finite number, so no patching effect can be "
            "measured. Check it on the unpatched logits (e.g. a log of 0, a division by a zero difference)."
        )
    return value
