"""Exact edge patching, path patching and edge attribution (EAP, EAP-IG) on a patching experiment's pairs."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from workbench.circuits.graph import Graph, Receiver
from workbench.circuits.result import EdgeResult, agreement
from workbench.circuits.runner import outputs, receiver_gradients, run_variants
from workbench.patching import PatchingExperiment
from workbench.patching.components import Metric, check_direction, runs_of
from workbench.patching.metrics import check_metric, metric_name

EAP_METHODS = ("eap", "eap-ig")


def edge_rows(graph: Graph, index: Sequence[int]) -> pd.DataFrame:
    return graph.edge_table().iloc[list(index)].reset_index(drop=True)


def select_edges(graph: Graph, edges) -> list[int]:
    """Edge indices from None (all), indices, or (sender, receiver) name pairs."""
    if edges is None:
        return list(range(len(graph.edges)))
    chosen = [e if isinstance(e, int) else graph.find(*e) for e in edges]
    if not chosen:
        raise ValueError("No edges to patch: pass at least one edge, or edges=None for all of them.")
    return chosen


def _result(experiment, graph, rows, per_pair, metric, direction, method, normalize) -> EdgeResult:
    base = experiment.baseline_per_pair(metric, runs_of(direction)[0]).double()
    clean, corrupted = experiment.baseline(metric, "clean"), experiment.baseline(metric, "corrupted")
    if normalize and abs(clean - corrupted) < 1e-9 * max(1.0, abs(clean)):
        raise ValueError(
            f"The clean and corrupted runs score the same ({clean:.6g}) on this metric, so nothing can be "
            "normalised: choose prompts whose behaviour differs, or pass normalize=False."
        )
    return EdgeResult(
        rows=rows,
        per_pair=per_pair.double(),
        base_per_pair=base,
        metric=metric_name(metric),
        direction=direction,
        method=method,
        normalized=normalize,
        clean_value=clean,
        corrupted_value=corrupted,
        meta=experiment.describe(),
    )


def edge_patch(
    experiment: PatchingExperiment,
    metric: Metric = "logit_diff",
    *,
    edges=None,
    direction: str = "denoise",
    normalize: bool = True,
    **batching,
) -> EdgeResult:
    """Exact edge patching: one patched run per edge, in which only that edge's receiver sees the sender's
    output from the other run (everything else as in the base run, downstream effects recomputed).
    Batched like node patching (max_batch, memory_budget, progress)."""
    metric, direction = check_metric(metric, experiment.pairs), check_direction(direction)
    graph = Graph(experiment.model.cfg)
    chosen = select_edges(graph, edges)
    A = torch.zeros(len(chosen), len(graph.senders), len(graph.receivers), dtype=torch.bool)
    for v, i in enumerate(chosen):
        s, r = graph.edges[i]
        A[v, graph.sender_index[s], graph.receiver_index[r]] = True
    per_pair = run_variants(experiment, graph, A, metric, direction, **batching)
    rows = edge_rows(graph, chosen)
    return _result(experiment, graph, rows, per_pair, metric, direction, "edge patching", normalize)


def receivers_named(graph: Graph, names) -> list[Receiver]:
    """Receivers from names ("L2H1.q", "MLP0", "logits") or kinds ("q", "k", "v", "mlp", "logits")."""
    if names is None:
        return list(graph.receivers)
    names = [names] if isinstance(names, str) else list(names)
    chosen = [r for r in graph.receivers if r.name in names or r.kind in names]
    unknown = [n for n in names if not any(r.name == n or r.kind == n for r in graph.receivers)]
    if unknown:
        raise ValueError(
            f"Unknown receivers {unknown}: name them like 'L2H1.q', 'L2KV0.k', 'MLP1', 'logits', or by kind "
            "('q', 'k', 'v', 'mlp', 'logits')."
        )
    return chosen


def path_patch(
    experiment: PatchingExperiment,
    metric: Metric = "logit_diff",
    *,
    senders: Sequence[str] | None = None,
    receivers=None,
    direction: str = "denoise",
    normalize: bool = True,
    **batching,
) -> EdgeResult:
    """Path patching: per sender, one run in which the chosen receivers (all downstream ones by default)
    see the sender's output from the other run through their direct edge; every other path keeps the base
    run's value of the sender (frozen), and what the receivers change is recomputed downstream."""
    metric, direction = check_metric(metric, experiment.pairs), check_direction(direction)
    graph = Graph(experiment.model.cfg)
    targets = receivers_named(graph, receivers)
    chosen = [s for s in graph.senders if senders is None or s.name in senders]
    if not chosen:
        raise ValueError(f"No senders among {senders}: name them 'embed', 'L<l>H<h>' or 'MLP<l>'.")
    A = torch.zeros(len(chosen), len(graph.senders), len(graph.receivers), dtype=torch.bool)
    reached = []
    for v, s in enumerate(chosen):
        rs = [r for r in targets if graph.reaches(s, r)]
        reached.append(rs)
        for r in rs:
            A[v, graph.sender_index[s], graph.receiver_index[r]] = True
    per_pair = run_variants(experiment, graph, A, metric, direction, **batching)
    rows = pd.DataFrame(
        {
            "sender": [s.name for s in chosen],
            "receiver": [_receivers_label(rs, len(graph.receivers)) for rs in reached],
            "input": [",".join(sorted({r.kind for r in rs})) for rs in reached],
            "sender_layer": [s.layer for s in chosen],
            "receivers": [len(rs) for rs in reached],
        }
    )
    return _result(experiment, graph, rows, per_pair, metric, direction, "path patching", normalize)


def _receivers_label(rs: list[Receiver], total: int) -> str:
    return ",".join(r.name for r in rs) if len(rs) <= 4 else f"{len(rs)} receivers"


def edge_attribution(
    experiment: PatchingExperiment,
    metric: Metric = "logit_diff",
    *,
    method: str = "eap",
    steps: int = 8,
    direction: str = "denoise",
    normalize: bool = True,
) -> EdgeResult:
    """Every edge's estimated effect from gradients: (alt_u - base_u) . d metric / d (receiver input),
    summed over positions, per pair. "eap": the gradient at the base run (Syed et al. 2023); "eap-ig": the
    gradient averaged over `steps` runs with embeddings interpolated from the base to the source run
    (Hanna et al. 2024). Same result format as `edge_patch` (per_pair = base metric + estimate)."""
    if method not in EAP_METHODS:
        raise ValueError(f"Unknown method {method!r}: one of {', '.join(EAP_METHODS)}.")
    metric, direction = check_metric(metric, experiment.pairs), check_direction(direction)
    graph = Graph(experiment.model.cfg)
    base, source = runs_of(direction)
    grads, _ = receiver_gradients(experiment, graph, metric, direction, steps if method == "eap-ig" else 0)
    before, after = outputs(experiment, base), outputs(experiment, source)
    diffs = torch.stack([(after.get(s) - before.get(s)).double() for s in graph.senders])  # [S, b, pos, d]
    gs = torch.stack([grads[r].double() for r in graph.receivers])  # [R, b, pos, d]
    scores = torch.einsum("sbpd,rbpd->bsr", diffs, gs).cpu()  # [pairs, S, R]
    s_idx = torch.tensor([graph.sender_index[s] for s, _ in graph.edges])
    r_idx = torch.tensor([graph.receiver_index[r] for _, r in graph.edges])
    per_edge = scores[:, s_idx, r_idx].T  # [edges, pairs]
    base_pairs = experiment.baseline_per_pair(metric, base).double()
    if per_edge.shape[1] != base_pairs.shape[0]:  # a scalar callable metric: one value for the batch
        per_edge = per_edge.sum(1, keepdim=True)
    per_pair = base_pairs[None] + per_edge
    rows = edge_rows(graph, range(len(graph.edges)))
    return _result(experiment, graph, rows, per_pair, metric, direction, method, normalize)


def compare_with_exact(
    experiment: PatchingExperiment,
    approx: EdgeResult,
    top: int = 20,
    metric: Metric | None = None,
    **batching,
) -> tuple[pd.Series, EdgeResult]:
    """Exact edge patching of `approx`'s top edges (by |score|), and how well the two agree there.

    metric: the metric `approx` used (needed only for a callable; a built-in one is read from `approx`)."""
    order = approx.scores.abs().argsort(descending=True)[:top].tolist()
    names = list(zip(approx.rows["sender"].iloc[order], approx.rows["receiver"].iloc[order]))
    exact = edge_patch(
        experiment, metric or approx.metric, edges=names, direction=approx.direction,
        normalize=approx.normalized, **batching,
    )  # fmt: skip
    return agreement(exact, approx), exact
