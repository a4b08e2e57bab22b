"""A circuit: a set of edges chosen by score, how much of the model's behaviour it keeps, and its picture."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch

from workbench import statistics
from workbench.circuits.graph import Graph, Receiver, Sender
from workbench.circuits.result import EdgeResult
from workbench.circuits.runner import run_variants
from workbench.patching import PatchingExperiment
from workbench.patching.metrics import check_metric

STYLE = {  # how each receiver input is drawn
    "q": {"color": "#1f77b4", "dash": "solid"},
    "k": {"color": "#2ca02c", "dash": "dash"},
    "v": {"color": "#d62728", "dash": "dot"},
    "mlp": {"color": "#7f7f7f", "dash": "solid"},
    "logits": {"color": "#000000", "dash": "solid"},
}


@dataclass
class Circuit:
    """Edges (sender name, receiver name) with their scores, on a model's graph."""

    graph: Graph
    edges: list[tuple[str, str]]
    scores: list[float]

    @classmethod
    def top(
        cls, result: EdgeResult, graph: Graph, *, count: int | None = None, threshold: float | None = None
    ):
        """The `count` edges of largest |score|, or every edge with |score| >= threshold."""
        if (count is None) == (threshold is None):
            raise ValueError("Choose the circuit's edges by count=N or by threshold=T (one of them).")
        scores = result.scores
        order = scores.abs().argsort(descending=True)
        chosen = order[:count] if count is not None else order[scores.abs()[order] >= threshold]
        index = chosen.tolist()
        edges = list(zip(result.rows["sender"].iloc[index], result.rows["receiver"].iloc[index]))
        return cls(graph, edges, scores[index].tolist())

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.edges, columns=["sender", "receiver"]).assign(score=self.scores)

    def faithfulness(
        self, experiment: PatchingExperiment, metric="logit_diff", *, ablation: str = "patch", **batching
    ) -> pd.Series:
        """The metric on the clean prompts with every edge outside the circuit carrying the corrupted run's
        sender output (ablation="patch") or its mean over pairs ("mean"), as a fraction of the full model's.

        fraction = mean(circuit) / mean(full model); normalized = (circuit - nothing) / (full - nothing),
        where "nothing" ablates every edge; a bootstrap interval over pairs for both.
        """
        metric = check_metric(metric, experiment.pairs)
        g = self.graph
        inside = {(g.find(s, r)) for s, r in self.edges}
        A = torch.zeros(2, len(g.senders), len(g.receivers), dtype=torch.bool)
        for i, (s, r) in enumerate(g.edges):
            A[1, g.sender_index[s], g.receiver_index[r]] = True
            if i not in inside:
                A[0, g.sender_index[s], g.receiver_index[r]] = True
        circuit, nothing = run_variants(experiment, g, A, metric, "noise", ablation=ablation, **batching)
        full = experiment.baseline_per_pair(metric, "clean").double()
        low, high = statistics.bootstrap_ratio_ci(circuit, full)
        n_low, n_high = statistics.bootstrap_ratio_ci(circuit - nothing, full - nothing)
        return pd.Series(
            {
                "edges": len(self.edges),
                "of_edges": len(g.edges),
                "circuit": float(circuit.mean()),
                "full_model": float(full.mean()),
                "nothing": float(nothing.mean()),
                "fraction": float(circuit.mean() / full.mean()),
                "fraction_ci": (low, high),
                "normalized": float((circuit - nothing).mean() / (full - nothing).mean()),
                "normalized_ci": (n_low, n_high),
                "ablation": ablation,
            }
        )

    # ------------------------------------------------------------------------------------------- figure
    def positions(self) -> dict[str, tuple[float, float]]:
        """Where each node is drawn: x = head (MLPs right), y = its layer (embedding top, logits bottom)."""
        g = self.graph
        pos = {"embed": ((g.n_heads - 1) / 2, -1.0), "logits": ((g.n_heads - 1) / 2, g.n_layers + 0.0)}
        for layer in range(g.n_layers):
            for h in range(g.n_heads):
                pos[f"L{layer}H{h}"] = (float(h), float(layer))
            pos[f"MLP{layer}"] = (g.n_heads + 0.5, layer + 0.5)
        return pos

    def _targets(self, receiver: str) -> tuple[str, list[str]]:
        for r in self.graph.receivers:
            if r.name == receiver:
                if r.kind in ("mlp", "logits"):
                    return r.kind, [r.name]
                return r.kind, [f"L{r.layer}H{h}" for h in self.graph.query_heads(r)]
        raise KeyError(receiver)

    def figure(self, title: str | None = None) -> go.Figure:
        """Layers top to bottom; edge width by |score|; q solid blue, k dashed green, v dotted red (a key
        or value edge goes to every query head of its KV group)."""
        pos = self.positions()
        top = max((abs(s) for s in self.scores), default=1.0) or 1.0
        fig = go.Figure()
        used: set[str] = set()
        shown: set[str] = set()
        for (sender, receiver), score in zip(self.edges, self.scores):
            kind, targets = self._targets(receiver)
            used.update([sender, *targets])
            for target in targets:
                (x0, y0), (x1, y1) = pos[sender], pos[target]
                fig.add_trace(
                    go.Scatter(
                        x=[x0, x1], y=[y0, y1], mode="lines",
                        line={"width": 0.5 + 6 * abs(score) / top, **STYLE[kind]},
                        name=kind, legendgroup=kind, showlegend=kind not in shown,
                        hovertext=f"{sender} -> {receiver} ({kind}): {score:+.3f}", hoverinfo="text",
                    )
                )  # fmt: skip
                shown.add(kind)
        nodes = sorted(used, key=lambda n: (pos[n][1], pos[n][0]))
        fig.add_trace(
            go.Scatter(
                x=[pos[n][0] for n in nodes], y=[pos[n][1] for n in nodes], mode="markers+text",
                text=nodes, textposition="top center", marker={"size": 12, "color": "#ffbf00"},
                name="nodes", hoverinfo="text",
            )
        )  # fmt: skip
        fig.update_layout(
            title=title or f"Circuit: {len(self.edges)} edges",
            yaxis={"autorange": "reversed", "title": "layer", "zeroline": False},
            xaxis={"title": "head (MLPs right)", "zeroline": False},
            height=160 + 90 * (self.graph.n_layers + 2),
            template="plotly_white",
        )
        return fig


__all__ = ["Circuit", "Receiver", "Sender"]
