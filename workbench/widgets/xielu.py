"""The xIELU explorer: a layer's learned curve over the distribution of its inputs, and one neuron up close.

`XIELUExplorer(model, stats)` takes the `XIELUStatistics` of one pass over a dataset (see
`workbench.xielu.xielu_statistics`) and shows: the regime shares by layer; the chosen layer's curve, its
minimum and its pre-activation histogram coloured by regime; and for the chosen neuron its top-activating
and most-negative examples (tokens in context, coloured by how far the neuron's pre-activation goes), the
tokens its output direction promotes and suppresses, and its share of output from each regime. Changing
a control only redraws: the model is never run again.
"""

from __future__ import annotations

import html

import ipywidgets as widgets
import pandas as pd

from workbench import figures
from workbench.hooked_model import HookedApertus
from workbench.widgets.controls import Choice, ChoiceButtons, IndexText
from workbench.widgets.tokens import colored_tokens_html
from workbench.xielu import XIELUStatistics, neuron_output_tokens, regime_share_figure, xielu_figure


class XIELUExplorer:
    """Controls: `layer` (Dropdown), `neuron` (BoundedIntText), `share_kind` (activations / output).
    Figures: `curve` (the layer's curve and input histogram) and `shares` (regimes by layer), both
    `workbench.figures.FigureView`s (cell outputs of their own). `neuron_panel` holds the neuron's examples
    and output tokens. Display `explorer` (or `explorer.widget`)."""

    def __init__(
        self,
        model: HookedApertus,
        stats: XIELUStatistics,
        *,
        layer: int | None = None,
        neuron: int = 0,
        examples: int = 5,
    ) -> None:
        self.model, self.stats, self.n_examples = model, stats, examples
        layer = stats.layers[0] if layer is None else model.check_layer(layer)
        if layer not in stats.layers:
            raise ValueError(f"layer {layer} was not gathered by these statistics (layers {stats.layers}).")
        if isinstance(neuron, bool) or not isinstance(neuron, int) or not 0 <= neuron < model.cfg.d_mlp:
            raise IndexError(f"neuron {neuron!r} is out of range (0..{model.cfg.d_mlp - 1}).")
        self.layer = Choice(
            what="layer",
            hint=" (the layers these statistics gathered)",
            options=[(f"layer {la}", la) for la in stats.layers],
            value=layer,
            description="layer",
            layout=widgets.Layout(width="160px"),
        )
        self.neuron = IndexText(
            model.cfg.d_mlp,
            what="neuron",
            value=neuron,
            description="neuron",
            layout=widgets.Layout(width="180px"),
        )
        self.share_kind = ChoiceButtons(
            what="share_kind",
            options=[("of activations", "activations"), ("of MLP output", "output")],
            value="activations",
        )
        self.layer.add_class("wb-layer")
        self.neuron.add_class("wb-neuron")
        self.curve = figures.FigureView(xielu_figure(model, layer, stats))
        self.shares = figures.FigureView(regime_share_figure(stats))
        self.curve.add_class("wb-xielu-curve")
        self.shares.add_class("wb-xielu-shares")
        self.neuron_panel = figures.HTMLView()
        self.layer.observe(lambda _: self._refresh(), names="value")
        self.neuron.observe(lambda _: self._refresh_neuron(), names="value")
        self.share_kind.observe(lambda _: self._refresh_shares(), names="value")
        self.widget = figures.ViewLayout(
            [
                widgets.HTML(
                    f"<b>Regimes by layer</b> over {stats.n_tokens} tokens of {stats.n_prompts} prompts"
                ),
                self.share_kind,
                self.shares,
                widgets.HBox([self.layer, self.neuron]),
                self.curve,
                self.neuron_panel,
            ],
            "wb-xielu-explorer",
        )
        self._refresh_neuron()

    def _ipython_display_(self) -> None:
        self.widget._ipython_display_()

    def show(self, layer: int | None = None, neuron: int | None = None) -> None:
        """Select a layer and/or neuron, as if the controls were set by hand."""
        if neuron is not None:
            if not 0 <= neuron < self.model.cfg.d_mlp:
                raise IndexError(f"neuron {neuron} is out of range (0..{self.model.cfg.d_mlp - 1}).")
            self.neuron.value = neuron
        if layer is not None:
            self.layer.value = self.model.check_layer(layer)

    def _refresh(self) -> None:
        self.curve.show(xielu_figure(self.model, self.layer.value, self.stats))
        self._refresh_neuron()

    def _refresh_shares(self) -> None:
        self.shares.show(regime_share_figure(self.stats, self.share_kind.value))

    def _refresh_neuron(self) -> None:
        self.neuron_panel.value = neuron_html(
            self.model, self.stats, self.layer.value, self.neuron.value, self.n_examples
        )


def neuron_html(
    model: HookedApertus, stats: XIELUStatistics, layer: int, neuron: int, examples: int = 5
) -> str:
    """One neuron as HTML: regime table, top and most-negative examples in context, output tokens."""
    regimes = stats.neuron_regimes(layer, neuron)
    tokens = neuron_output_tokens(model, layer, neuron, k=8)
    parts = [f"<h4>Layer {layer}, neuron {neuron}</h4>", _regime_table(regimes)]
    scale = max(
        abs(float(stats.top_values[layer, neuron, 0])),
        abs(float(stats.bottom_values[layer, neuron, 0])),
        1e-6,
    )
    for which, title in (("top", "Largest pre-activations"), ("bottom", "Most negative pre-activations")):
        table = stats.examples(layer, neuron, which).head(examples)
        parts.append(f"<b>{title}</b>")
        for row in table.itertuples():
            values = [0.0] * len(row.context)
            values[row.focus] = row.value
            text = colored_tokens_html(row.context, values, vmax=scale, selected=row.focus)
            parts.append(
                f'<div style="display:flex;gap:8px;align-items:center"><code>{row.value:+.2f}</code>'
                f"<small>{html.escape(row.regime)}</small>{text}</div>"
            )
    promoted = ", ".join(html.escape(repr(t)) for t in tokens[tokens.kind == "promoted"].token)
    suppressed = ", ".join(html.escape(repr(t)) for t in tokens[tokens.kind == "suppressed"].token)
    parts.append(
        "<b>Output direction through the unembedding</b> (for a positive post-activation; the "
        f"negative branch swaps them)<br>promotes: {promoted}<br>suppresses: {suppressed}"
    )
    return "".join(parts)


def _regime_table(regimes: pd.DataFrame) -> str:
    table = regimes.assign(
        share_of_activations=regimes.share_of_activations.map("{:.1%}".format),
        share_of_output=regimes.share_of_output.map("{:.1%}".format),
    )
    return table.to_html(border=0)
