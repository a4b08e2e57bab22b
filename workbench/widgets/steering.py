"""A steering view: a prompt, a layer, a coefficient and a vector source; the plain and the steered
continuation one above the other, and the logit difference of two chosen tokens as the coefficient varies
(each a cell output below the controls, redrawn in place: `workbench.figures.ViewLayout`)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch

from workbench import figures
from workbench.interventions import Steer, SteeringVector, contrastive_vector
from workbench.token_text import escape_label
from workbench.widgets.controls import Choice, FloatSlider, TextBox

Source = SteeringVector | tuple[Sequence[str], Sequence[str]]


class SteeringView:
    """Steer `prompt` along a vector from `sources` and compare with the unsteered model.

    sources: name -> a `SteeringVector` (added as it is at the chosen layer) or a pair of prompt lists
    `(positives, negatives)` (rebuilt at the chosen layer with `contrastive_vector`, kept per layer).
    tokens: (a, b), the logit difference a - b at the prompt's last position is drawn for each of
    `coefficients`. Changing any control recomputes; `plain_text`, `steered_text` and `figure` hold the
    results (for scripts and tests).
    """

    def __init__(
        self,
        model: Any,
        prompt: str,
        sources: Mapping[str, Source],
        tokens: tuple[str, str],
        *,
        layer: int = 0,
        coefficient: float = 1.0,
        coefficients: Sequence[float] = tuple(np.linspace(-4, 4, 17)),
        positions: str = "last",
        max_new_tokens: int = 12,
    ) -> None:
        if not sources:
            raise ValueError(
                "Give at least one vector source: {name: SteeringVector or (positives, negatives)}."
            )
        self.model, self.sources, self.positions, self.max_new_tokens = (
            model,
            dict(sources),
            positions,
            max_new_tokens,
        )
        self.token_ids = [model.to_single_token(t) for t in tokens]
        self.tokens, self.coefficients = tuple(tokens), [float(c) for c in coefficients]
        self._vectors: dict[tuple[str, int], torch.Tensor] = {}
        self.prompt = TextBox(what="prompt", value=prompt, description="prompt", layout={"width": "100%"})
        self.layer = Choice(
            what="layer",
            options=list(range(model.cfg.n_layers)),
            value=model.check_layer(layer),
            description="layer",
        )
        self.source = Choice(what="source", options=list(self.sources), description="vector")
        lo, hi = min(self.coefficients), max(self.coefficients)
        self.coefficient = FloatSlider(
            what="coefficient",
            hint=" (the range of the coefficients swept)",
            value=coefficient,
            min=lo,
            max=hi,
            step=(hi - lo) / 40,
            description="coefficient",
            continuous_update=False,
        )
        self.plain = figures.HTMLView()
        self.steered = figures.HTMLView()
        self.figure = figures.FigureView()
        self.status = widgets.HTML()
        for control in (self.prompt, self.layer, self.source, self.coefficient):
            control.observe(lambda change: self.update(), names="value")
        controls = widgets.HBox([self.layer, self.source, self.coefficient])
        self.widget = figures.ViewLayout(
            [self.prompt, controls, self.status, self.plain, self.steered, self.figure], "wb-steering-view"
        )
        self.update()

    def _ipython_display_(self) -> None:
        self.widget._ipython_display_()

    def vector(self) -> torch.Tensor:
        """The current source's vector at the current layer."""
        name, layer = self.source.value, self.layer.value
        source = self.sources[name]
        if isinstance(source, SteeringVector):
            return source.vector
        if (name, layer) not in self._vectors:
            positives, negatives = source
            self._vectors[name, layer] = contrastive_vector(self.model, positives, negatives, layer)
        return self._vectors[name, layer].vector

    def steer(self, alpha: float) -> Steer:
        return Steer(self.vector(), self.layer.value, alpha=alpha, positions=self.positions)

    def update(self) -> None:
        model, prompt = self.model, self.prompt.value
        if not prompt.strip():
            self.status.value = "<i>Type a prompt.</i>"
            return
        vector = self.vector()
        self.status.value = (
            f"vector norm {float(vector.float().norm()):.3g}; steering {self.coefficient.value:g} x vector "
            f"at resid_pre {self.layer.value}, {self.positions} positions"
        )
        generate = dict(max_new_tokens=self.max_new_tokens, progress=False)
        self.plain_text = model.generate(prompt, **generate)
        steer = self.steer(self.coefficient.value)
        self.steered_text = model.generate(prompt, fwd_hooks=steer.hooks(model), **generate)
        self.plain.value = _text("not steered", prompt, self.plain_text)
        self.steered.value = _text("steered", prompt, self.steered_text)
        self.logit_diffs = [self._logit_diff(alpha) for alpha in self.coefficients]
        self._draw()

    def _logit_diff(self, alpha: float) -> float:
        with torch.no_grad():
            logits = self.model.run_with_hooks(
                self.prompt.value, fwd_hooks=self.steer(alpha).hooks(self.model)
            )
        last = logits[0, -1].float()
        return float(last[self.token_ids[0]] - last[self.token_ids[1]])

    def _draw(self) -> None:
        a, b = (escape_label(t) for t in self.tokens)
        current = self._logit_diff(self.coefficient.value)
        fig = go.Figure()
        fig.add_scatter(x=self.coefficients, y=self.logit_diffs, mode="lines+markers", name="sweep")
        fig.add_scatter(x=[self.coefficient.value], y=[current], mode="markers", name="now",
                        marker={"size": 12, "symbol": "diamond"})  # fmt: skip
        fig.update_layout(
            title=f"logit({a}) - logit({b}) at the last prompt token",
            xaxis_title="coefficient",
            yaxis_title="logit difference",
            height=320,
            margin={"t": 40, "b": 40},
            shapes=[
                {
                    "type": "line",
                    "xref": "paper",
                    "x0": 0,
                    "x1": 1,
                    "y0": 0,
                    "y1": 0,
                    "line": {"dash": "dot", "color": "grey"},
                }
            ],  # fmt: skip
        )
        self.figure.show(fig)


def _text(title: str, prompt: str, continuation: str) -> str:
    return (
        f"<b>{title}</b><pre style='white-space:pre-wrap;margin:0'>{html.escape(prompt)}"
        f"<b style='color:#1f77b4'>{html.escape(continuation)}</b></pre>"
    )
