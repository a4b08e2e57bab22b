"""`CircuitView(result, graph)`: choose a circuit's size (and which inputs to show) and see its graph.

State is plain attributes (`circuit`, `figure`, `count`, `inputs`) so tests can drive it without a browser.
"""

from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go

from workbench import figures
from workbench.circuits import Circuit, EdgeResult, Graph
from workbench.widgets.controls import Choices, IntSlider

KINDS = ("q", "k", "v", "mlp", "logits")


class CircuitView:
    """A slider for the number of top edges, toggles for the input kinds, and the circuit's graph view."""

    def __init__(self, result: EdgeResult, graph: Graph, count: int | None = None) -> None:
        """count: the number of top edges shown first (1..the result's edges; by default 20, or all when
        there are fewer). A count outside that range is refused with the range, not clamped."""
        self.result, self.graph = result, graph
        n = len(result.rows)
        self.count = IntSlider(
            what="count",
            hint=f" (the result has {n} edges)",
            value=min(20, n) if count is None else count,
            min=1,
            max=n,
            description="top edges",
        )
        self.inputs = Choices(what="inputs", options=KINDS, value=KINDS, description="inputs", rows=5)
        self.figure = figures.FigureView()  # a cell output of plotly's mime type: no plotly.js saved
        self.table = figures.HTMLView()
        self.count.observe(lambda _: self.refresh(), "value")
        self.inputs.observe(lambda _: self.refresh(), "value")
        self.widget = figures.ViewLayout(
            [widgets.HBox([self.count, self.inputs]), self.figure, self.table], "wb-circuit-view"
        )
        self.refresh()

    def _ipython_display_(self) -> None:
        self.widget._ipython_display_()

    def refresh(self) -> Circuit:
        """Rebuild the circuit from the current choices and redraw."""
        keep = self.result.rows["input"].isin(self.inputs.value).to_numpy().nonzero()[0]
        shown = self.result.subset(keep)
        self.circuit = (
            Circuit.top(shown, self.graph, count=min(self.count.value, len(keep))) if len(keep) else None
        )
        fig = self.circuit.figure() if self.circuit else go.Figure()
        self.figure.show(fig)
        self.table.value = (
            self.circuit.table.to_html(float_format=lambda x: f"{x:+.3f}") if self.circuit else ""
        )
        return self.circuit
