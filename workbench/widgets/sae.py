"""The SAE feature view: one latent's examples, activation histogram, output tokens and neighbours.

``FeatureView(model, sae, stats)`` takes the :class:`workbench.sae.FeatureStatistics` of one dataset pass
and shows, for the chosen feature, its top-activating and typical examples (tokens in context, shaded by
the feature's activation on each, the example outlined, as the xIELU neuron view draws them), the
histogram of its activations, the tokens its direction promotes and suppresses through the unembedding,
and the nearest features by decoder cosine. Changing the feature only redraws: the model is not rerun.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from workbench import figures
from workbench.sae import FeatureStatistics, SparseAutoencoder, feature_output_tokens, nearest_features
from workbench.widgets.controls import IndexText
from workbench.widgets.tokens import colored_tokens_html


class FeatureView:
    """Control: ``feature`` (an ``IndexText``: a feature outside 0..d_sae-1 is refused with the range).
    ``histogram`` (a figures.FigureView), ``panel`` (HTML). Display ``view.widget``."""

    def __init__(
        self,
        model: Any,
        sae: SparseAutoencoder,
        stats: FeatureStatistics,
        *,
        feature: int = 0,
        examples: int = 5,
    ) -> None:
        self.model, self.sae, self.stats, self.n_examples = model, sae, stats, examples
        self.feature = IndexText(
            sae.cfg.d_sae,
            what="feature",
            value=feature,
            description="feature",
            layout=widgets.Layout(width="180px"),
        )
        self.feature.add_class("wb-sae-feature")
        self.histogram = figures.FigureView(stats.histogram_figure(feature))
        self.panel = figures.HTMLView()
        self.feature.observe(lambda _: self._refresh(), names="value")
        self.widget = figures.ViewLayout(
            [widgets.HTML(f"<b>{html.escape(repr(sae))}</b>"), self.feature, self.histogram, self.panel],
            "wb-sae-view",
        )
        self._refresh()

    def _ipython_display_(self) -> None:
        self.widget._ipython_display_()

    def show(self, feature: int) -> None:
        """Select a feature, as if typed in the control."""
        self.feature.value = feature  # the control refuses a feature out of range, naming the range

    def _refresh(self) -> None:
        f = self.feature.value
        self.histogram.show(self.stats.histogram_figure(f))
        self.panel.value = feature_html(self.model, self.sae, self.stats, f, self.n_examples)


def feature_html(
    model: Any, sae: SparseAutoencoder, stats: FeatureStatistics, feature: int, examples: int = 5
) -> str:
    """One feature as HTML: examples in context, output tokens, nearest features."""
    parts = [
        f"<h4>Feature {feature}</h4><small>active on {stats.frequency[feature]:.2%} of "
        f"{stats.n_tokens} tokens, "
        f"mean activation {stats.mean_activation[feature]:.3g}</small>"
    ]
    top = stats.examples(feature, "top")
    scale = float(top.value.max()) if len(top) else 1.0
    for which, title in (("top", "Top activations"), ("typical", "Typical activations (random sample)")):
        table = stats.examples(feature, which).head(examples)
        parts.append(f"<br><b>{title}</b>")
        if table.empty:
            parts.append(" <i>never active on this data</i>")
        for row in table.itertuples():
            text = colored_tokens_html(row.context, row.context_acts, vmax=scale, selected=row.focus)
            parts.append(
                '<div style="display:flex;gap:8px;align-items:center">'
                f"<code>{row.value:.2f}</code>{text}</div>"
            )
    tokens = feature_output_tokens(model, sae, feature, k=8)
    for kind in ("promoted", "suppressed"):
        listed = ", ".join(html.escape(repr(t)) for t in tokens[tokens.kind == kind].token)
        parts.append(f"<br><b>{kind}</b> through the unembedding: {listed}")
    near = nearest_features(sae, feature, 5)
    listed = ", ".join(f"{r.feature} ({r.cosine:.2f})" for r in near.itertuples())
    parts.append(f"<br><b>nearest features</b> (decoder cosine): {listed}")
    return "".join(parts)
