"""Statistics over prompt pairs: a bootstrap interval of the mean and a sign-flip test, for many cells.

Patching and circuit results keep one value per prompt pair and cell. These functions summarise each cell
(each row of `values [cells, pairs]`) with the mean, the standard deviation, a percentile bootstrap interval
of the mean (resampling pairs) and a two-sided sign-flip p-value for "the mean effect is zero" (a
permutation test for paired differences: under the null each pair's effect is as likely negative as positive).
Both draw from one seeded generator, so a table is reproducible.
"""

from __future__ import annotations

import pandas as pd
import torch

RESAMPLES = 2000
CONFIDENCE = 0.95


def bootstrap_ci(
    values: torch.Tensor, resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bootstrap interval (low, high) of each row's mean; values [cells, pairs]."""
    values = values.double()
    n = values.shape[1]
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (resamples, n), generator=generator)
    means = values[:, draws].mean(-1)  # [cells, resamples]
    alpha = (1 - confidence) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    low, high = torch.quantile(means, q, dim=1)
    return low, high


def sign_flip_p(values: torch.Tensor, resamples: int = RESAMPLES, seed: int = 1) -> torch.Tensor:
    """Two-sided sign-flip p-value of each row's mean against zero (with the +1 correction, never 0)."""
    values = values.double()
    n = values.shape[1]
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (resamples, n), generator=generator).double() * 2 - 1
    observed = values.mean(1).abs()
    flipped = (values @ signs.T / n).abs()  # [cells, resamples]
    extreme = (flipped >= observed[:, None] - 1e-12).sum(1)
    return (extreme.double() + 1) / (resamples + 1)


def summary(values: torch.Tensor, resamples: int = RESAMPLES, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """mean, std, ci_low, ci_high, p_value, ci_excludes_zero per row of values [cells, pairs].

    With fewer than two pairs nothing can be estimated: the spread columns are NaN.
    """
    values = values.double()
    mean = values.mean(1)
    if values.shape[1] < 2:
        nan = torch.full_like(mean, float("nan"))
        frame = pd.DataFrame({"mean": mean, "std": nan, "ci_low": nan, "ci_high": nan, "p_value": nan})
        frame["ci_excludes_zero"] = False
        return frame
    low, high = bootstrap_ci(values, resamples, confidence)
    frame = pd.DataFrame(
        {
            "mean": mean.numpy(),
            "std": values.std(1).numpy(),
            "ci_low": low.numpy(),
            "ci_high": high.numpy(),
            "p_value": sign_flip_p(values, resamples).numpy(),
        }
    )
    frame["ci_excludes_zero"] = (frame["ci_low"] > 0) | (frame["ci_high"] < 0)
    return frame


def method_note(n_pairs: int, resamples: int = RESAMPLES, confidence: float = CONFIDENCE) -> str:
    return (
        f"over {n_pairs} prompt pairs: {confidence:.0%} percentile bootstrap interval of the mean effect "
        f"({resamples} resamples of pairs); two-sided sign-flip test of mean effect = 0 ({resamples} random "
        "sign flips, p = (extreme + 1) / (resamples + 1))"
    )


def bootstrap_ratio_ci(
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(numerator) / mean(denominator), resampling pairs together."""
    n = numerator.shape[0]
    generator = torch.Generator().manual_seed(2)
    draws = torch.randint(0, n, (resamples, n), generator=generator)
    ratios = numerator.double()[draws].mean(1) / denominator.double()[draws].mean(1)
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(ratios, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(low), float(high)


def agreement_of(a: pd.Series, b: pd.Series, count: str) -> pd.Series:
    """Pearson and Spearman correlation of two aligned score columns, their number and largest difference
    (exact against approximate patching, node or edge)."""
    if len(a) < 2:
        raise ValueError(f"Fewer than two shared {count}: nothing to correlate.")
    return pd.Series(
        {"pearson": a.corr(b), "spearman": a.corr(b, method="spearman"), count: len(a),
         "max_abs_diff": (a - b).abs().max()}
    )  # fmt: skip
