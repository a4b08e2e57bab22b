"""Circuits on grouped-query attention: the edge graph, edge and path patching, edge attribution, circuits.

On a `PatchingExperiment`'s prompt pairs and metrics:
- `Graph(model.cfg)`: senders (embedding, each head's output, each MLP) and receivers (each query head's q,
  each KV head's k and v -- shared by its group's query heads -- each MLP's input, the logits).
- `edge_patch(experiment, metric, edges=...)`: exact, one patched run per edge, batched.
- `path_patch(experiment, metric, senders=..., receivers=...)`: sender -> receivers, the rest frozen.
- `edge_attribution(experiment, metric, method="eap" | "eap-ig")`: every edge from gradients;
  `compare_with_exact(experiment, approx, top=20)` checks its top edges exactly.
- `Circuit.top(result, count=... | threshold=...)`: its `faithfulness(experiment)` and `figure()`.
Results keep per-pair values; `.table` adds bootstrap intervals and sign-flip p-values; `save`/`load` JSON.

Layout: `graph`, `forward` (receivers with inputs of their own), `runner` (batched variants, gradients),
`edges` (the analyses), `result`, `circuit`.
"""

from workbench.circuits.circuit import Circuit
from workbench.circuits.edges import compare_with_exact, edge_attribution, edge_patch, path_patch
from workbench.circuits.graph import Graph, Receiver, Sender
from workbench.circuits.result import EdgeResult, agreement

__all__ = [
    "Circuit",
    "EdgeResult",
    "Graph",
    "Receiver",
    "Sender",
    "agreement",
    "compare_with_exact",
    "edge_attribution",
    "edge_patch",
    "path_patch",
]
