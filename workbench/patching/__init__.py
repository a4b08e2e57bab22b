"""Activation patching: copy one activation from one run into another and measure what comes back.

`patch(model, clean, corrupted, "logit_diff", answers=(" Mary", " John"), component="resid_pre")` runs a
whole sweep (every layer x position) in a few batched forwards: the patched variants are stacked along the
batch dimension (row block j patches cell j), chunked to a memory budget, against one clean and one
corrupted forward that are run once and reused. `attribution_patch(...)` estimates every cell of several
components from one clean forward and one corrupted forward and backward (the gradient approximation), in
the same result format, and `correlation(exact, approx)` says how far the estimate can be trusted.

Directions: "denoise" runs the corrupted prompt and patches clean activations in (what restores the
behaviour?); "noise" runs the clean prompt and patches corrupted activations in (what breaks it?). Either
way the normalised value is 0 for the corrupted run's metric and 1 for the clean run's.

Keys and values have one head per KV group (grouped-query attention): `k` and `v` are patched per KV head
(table column `kv_head`, with the query heads that read it in `query_heads`), as TransformerLens does.

Layout: `components` (what can be patched), `experiment` (the runs, metrics, sweeps, attribution),
`forward` (the batched patched forward), `result` (tables and figures), `inputs` (prompt and answer checks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from workbench.hooked_model import HookedApertus
from workbench.patching.components import COMPONENTS, METRICS, Metric, Prompts
from workbench.patching.experiment import PatchingExperiment
from workbench.patching.result import PatchResult, correlation

__all__ = [
    "COMPONENTS",
    "METRICS",
    "PatchResult",
    "PatchingExperiment",
    "attribution_patch",
    "correlation",
    "patch",
]


def patch(
    model: HookedApertus,
    clean: Prompts,
    corrupted: Prompts,
    metric: Metric = "logit_diff",
    *,
    answers: Any = None,
    component: str = "resid_pre",
    direction: str = "denoise",
    normalize: bool = True,
    attention_mask: torch.Tensor | None = None,
    **sweep: Any,
) -> PatchResult:
    """Exact activation patching of one component over every cell, in a few batched forwards.

    metric: "logit_diff" (answers=(correct, wrong)), "answer_prob", "kl" (KL(clean || patched) at the last
    token; normalised, 1 = the clean distribution) or a callable on logits [prompts, pos, vocab] returning a
    scalar or one value per prompt. component: one of COMPONENTS. direction: "denoise" or "noise".
    Further keywords (layer, layers, positions, cells, max_batch, memory_budget, progress) go to
    `PatchingExperiment.run`. The result's `.table` and `.figure()` show it.
    """
    experiment = PatchingExperiment(model, clean, corrupted, answers, attention_mask=attention_mask)
    return experiment.run(component, metric, direction=direction, normalize=normalize, **sweep)


def attribution_patch(
    model: HookedApertus,
    clean: Prompts,
    corrupted: Prompts,
    metric: Metric = "logit_diff",
    *,
    answers: Any = None,
    components: str | Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "heads"),
    direction: str = "denoise",
    normalize: bool = True,
    layer: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> PatchResult | dict[str, PatchResult]:
    """Attribution patching of several components at once (a dict by name; one result for one name)."""
    experiment = PatchingExperiment(model, clean, corrupted, answers, attention_mask=attention_mask)
    return experiment.attribute(components, metric, direction=direction, normalize=normalize, layer=layer)
