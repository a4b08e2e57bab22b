"""The patching view: choose a component, metric, direction and method; read the heatmap; click a cell.

`PatchingView(experiment)` shows `workbench.patching` results. Its state is plain attributes so tests and
notebooks can drive it without a browser: set `view.component.value = "heads"` (or metric, direction,
method, layer) and `view.result` is recomputed; `view.select(cell)` (what a click on the heatmap does) fills
`view.predictions`, the patched run's top next tokens beside the clean and corrupted runs'. The `cell`
dropdown lists the cells strongest first; choosing one selects it (the heatmap is a static plotly figure in a
cell output of its own, so it renders offline and in saved notebooks, with or without a kernel, but does not
report clicks). Display `view` (or `view.widget`).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping

import ipywidgets as widgets
import pandas as pd
import torch

from workbench import figures
from workbench.patching import COMPONENTS, PatchingExperiment, PatchResult
from workbench.widgets.controls import Choice, ChoiceButtons
from workbench.widgets.tokens import colored_tokens_html

MAX_CELLS = 200


class PatchingView:
    """An interactive activation-patching heatmap over one `PatchingExperiment`.

    metrics: extra named metrics (callables on logits [prompts, pos, vocab]) offered beside the built-in
    ones the experiment's answers allow. k: how many next-token predictions the cell table lists.
    """

    def __init__(
        self,
        experiment: PatchingExperiment,
        *,
        component: str = "resid_pre",
        metrics: Mapping[str, Callable] | None = None,
        k: int = 5,
        prompt: int = 0,
    ) -> None:
        self.experiment = experiment
        self.k, self.prompt = k, prompt
        self._custom = dict(metrics or {})
        builtin = ["kl"]
        if experiment.answer_ids is not None:
            builtin.insert(0, "answer_prob")
            if experiment.wrong_ids is not None:
                builtin.insert(0, "logit_diff")
        self._results: dict[tuple, PatchResult] = {}
        self.result: PatchResult | None = None
        self.selected: tuple[int, ...] | None = None
        self.predictions: pd.DataFrame | None = None

        self.component = Choice(
            what="component", options=list(COMPONENTS), value=component, description="component"
        )
        self.metric = Choice(what="metric", options=builtin + list(self._custom), description="metric")
        self.direction = ChoiceButtons(
            what="direction",
            options=[("denoise: clean into corrupted", "denoise"), ("noise: corrupted into clean", "noise")],
            value="denoise",
        )
        self.method = ChoiceButtons(what="method", options=["exact", "attribution"], value="exact")
        n_layers = experiment.model.cfg.n_layers
        self.layer = Choice(what="layer", options=list(range(n_layers)), value=0, description="neuron layer")
        self.status = widgets.HTML()
        self.figure = figures.FigureView()
        self.cell = Choice(
            what="cell",
            hint=" (the strongest cells; view.select(cell) takes any cell of the result)",
            description="cell",
            layout=widgets.Layout(width="420px"),
        )
        self.cell.observe(self._cell_chosen, names="value")
        self.prompt_view = figures.HTMLView()
        self.table = figures.HTMLView()
        for control in (self.component, self.metric, self.direction, self.method, self.layer):
            control.observe(self._changed, names="value")
        controls = widgets.VBox(
            [widgets.HBox([self.component, self.metric, self.layer]), self.direction, self.method]
        )
        self.widget = figures.ViewLayout(
            [controls, self.status, self.figure, self.cell, self.prompt_view, self.table], "wb-patching-view"
        )
        self.refresh()

    def _ipython_display_(self) -> None:
        self.widget._ipython_display_()

    # ------------------------------------------------------------------------------------------- state
    def _changed(self, change) -> None:
        self.refresh()

    def _metric(self):
        name = self.metric.value
        return self._custom.get(name, name)

    def refresh(self) -> PatchResult:
        """Recompute (or fetch) the result for the current choices and redraw the heatmap."""
        component = self.component.value
        self.layer.layout.display = None if component == "neurons" else "none"
        layer = self.layer.value if component == "neurons" else None
        key = (component, self.metric.value, self.direction.value, self.method.value, layer)
        if key not in self._results:
            self.status.value = "<i>computing…</i>"
            if self.method.value == "exact":
                result = self.experiment.run(
                    component, self._metric(), direction=self.direction.value, layer=layer, progress=False
                )
            else:
                result = self.experiment.attribute(
                    component, self._metric(), direction=self.direction.value, layer=layer
                )
            self._results[key] = result
        self.result = self._results[key]
        self._draw()
        self.selected, self.predictions = None, None
        self.table.value = "<i>Click a cell to see that patched run's next-token predictions.</i>"
        self.prompt_view.value = self._prompts_html(None)
        r = self.result
        self.status.value = (
            f"{r.metric}: clean {r.clean_value:.3f}, corrupted {r.corrupted_value:.3f}; "
            f"values {'normalised (0 = corrupted, 1 = clean)' if r.normalized else 'raw'}"
        )
        return self.result

    def _draw(self) -> None:
        self.figure.show(self.result.figure())
        r = self.result
        # The strongest MAX_CELLS only: a neuron sweep has d_mlp cells, too many for a dropdown to carry.
        order = r.values.abs().nan_to_num(-1.0).argsort(descending=True)[:MAX_CELLS].tolist()
        options = [("choose a cell (strongest first)", None)]
        for i in order:
            label = ", ".join(f"{a} {c}" for a, c in zip(r.axes, r.cells[i]))
            options.append((f"{label}: {r.values[i].item():+.3f}", tuple(r.cells[i])))
        self._quiet = True
        try:
            self.cell.options = options
            self.cell.value = None
        finally:
            self._quiet = False

    def _cell_chosen(self, change) -> None:
        if not getattr(self, "_quiet", False) and change["new"] is not None:
            self.select(change["new"])

    def select(self, cell: tuple[int, ...]) -> pd.DataFrame:
        """Show one cell's patched run: its top-k predictions against the clean and corrupted runs."""
        r = self.result
        cell = tuple(int(i) for i in cell)
        if cell not in r.cells:
            raise IndexError(f"{cell} is not a cell of this {r.component} result; its axes are {r.axes}.")
        self.selected = cell
        self.predictions = self.experiment.predictions(
            r.component, cell, direction=r.direction, k=self.k, prompt=self.prompt
        )
        value = r.values[r.cells.index(cell)].item()
        label = ", ".join(f"{a} {i}" for a, i in zip(r.axes, cell))
        self.table.value = (
            f"<b>{html.escape(label)}</b>: {r.method} value {value:.3f}. Top {self.k} next tokens of prompt "
            f"{self.prompt} (exact patched run):"
            + self.predictions.to_html(float_format=lambda p: f"{p:.3f}")
        )
        self.prompt_view.value = self._prompts_html(cell)
        return self.predictions

    def _prompts_html(self, cell) -> str:
        """Both prompts; for a layer x position result, coloured by the selected (or first) layer's values."""
        r, e = self.result, self.experiment
        clean = _tokens(e, "clean", self.prompt)
        corrupted = _tokens(e, "corrupted", self.prompt)
        if r.axes == ("layer", "pos"):
            layer = cell[0] if cell else r.cells[0][0]
            values = r.grid()[layer].nan_to_num(0.0).tolist()
            selected = cell[1] if cell else None
            lines = [f"layer {layer}, {r.component}:", colored_tokens_html(clean, values, selected=selected)]
        else:
            lines = ["clean:", colored_tokens_html(clean, [0.0] * len(clean))]
        changed = [a != b for a, b in zip(clean, corrupted)]
        lines += [
            "corrupted (changed tokens struck through):",
            colored_tokens_html(corrupted, [0.0] * len(corrupted), marked=changed),
        ]
        return "".join(f"<div>{line}</div>" for line in lines)


def _tokens(experiment: PatchingExperiment, run: str, prompt: int) -> list[str]:
    ids = experiment.tokens(run)[prompt]
    model = experiment.model
    if model.tokenizer is None:
        return [str(int(i)) for i in ids]
    return model.token_labels(torch.as_tensor(ids))
