"""The one place the workbench draws with plotly: palette, template, heatmaps, token labels, figure views.

Every analysis returns a `go.Figure` built here, and every widget shows figures through `FigureView`: a
cell output of its own holding the figure as plotly's own mime type (`application/vnd.plotly.v1+json`),
redrawn in place through its display id (`OutputSlot` says why not an `Output` widget). The JupyterLab
extension bundled with plotly (and VS Code's notebook renderers) draw that type offline, also in a saved
notebook reopened without a kernel, and a saved notebook stores only the figure's data, never the plotly.js
library (a `go.FigureWidget` stores ~4.7 MB of JavaScript per widget in the saved widget state). Numbers
travel as base64 typed arrays (plotly's own JSON). `ViewLayout` lays a view out as its controls (widgets)
and these outputs.
"""

from __future__ import annotations

import html
import json
import math
import re
import uuid
from collections.abc import Sequence

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from IPython.display import display, update_display
from plotly.subplots import make_subplots

from workbench.token_text import escape_label  # the one escaping rule, re-exported for figures

# ------------------------------------------------------------------------------------------------- palette
SEQUENTIAL = "Blues"  # magnitudes 0..max: attention, probabilities, scores
DIVERGING = "RdBu"  # signed values centred on 0: patching, attributions
POSITIVE = "#2166ac"
NEGATIVE = "#b2182b"
NEUTRAL = "#888888"
#: Categorical colours (lines, bars): colour-blind-safe (Okabe-Ito), first the two of the diverging scale.
COLORWAY = ["#2166ac", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#b2182b", "#000000"]

# ------------------------------------------------------------------------------------------------ template
#: Kept small on purpose: a figure carries its template in every saved output.
TEMPLATE = go.layout.Template(
    layout={
        "font": {"family": "Helvetica, Arial, sans-serif", "size": 12, "color": "#222"},
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",  # blank (null) heatmap cells, e.g. a causal pattern's future, stay blank
        "colorway": COLORWAY,
        "margin": {"l": 70, "r": 20, "t": 50, "b": 50},
        "hoverlabel": {"font": {"family": "monospace"}},
        "xaxis": {"showgrid": False, "zeroline": False, "linecolor": "#ccc", "ticks": "outside"},
        "yaxis": {"gridcolor": "#eee", "zeroline": False, "linecolor": "#ccc", "ticks": "outside"},
    }
)
pio.templates["workbench"] = TEMPLATE

# ------------------------------------------------------------------------------------ sizes of heatmaps
ROW_PX = 22  # one heatmap row
MIN_HEIGHT, MAX_HEIGHT = 280, 900
CHROME_PX = 150  # title, axis labels and ticks around the cells


def heatmap_height(n_rows: int, *, row_px: int = ROW_PX, chrome_px: int = CHROME_PX) -> int:
    """The one height rule of every heatmap: a fixed row height plus the chrome, within 280..900 px."""
    return int(min(MAX_HEIGHT, max(MIN_HEIGHT, chrome_px + row_px * n_rows)))


# ---------------------------------------------------------------------------------------------- labels
def token_labels(tokens: Sequence[str], positions: Sequence[int] | None = None) -> list[str]:
    """Axis labels `"position: token"` (unique even when a token repeats), escaped for plotly."""
    positions = range(len(tokens)) if positions is None else positions
    return [f"{p}: {escape_label(t)}" for p, t in zip(positions, tokens)]


def error_html(error: BaseException | str) -> str:
    """How every widget shows a problem: one red line where the user is looking."""
    return f'<span class="wb-error" style="color:{NEGATIVE}">{html.escape(str(error))}</span>'


# -------------------------------------------------------------------------------------------- figures
def figure(title: str | None = None, **layout) -> go.Figure:
    """An empty figure in the workbench template."""
    fig = go.Figure(layout={"template": TEMPLATE, **layout})
    if title is not None:
        fig.update_layout(title=title)
    return fig


def _cells(values) -> np.ndarray | list:
    """float32 numbers (NaN = blank cell) travel as a compact typed array; anything else as it is."""
    array = np.asarray(values)
    if array.dtype.kind in "fiub":
        return array.astype(np.float32)
    return values


def heatmap_trace(
    z,
    *,
    x=None,
    y=None,
    diverging: bool = False,
    zmin: float | None = None,
    zmax: float | None = None,
    text=None,
    text_format: str = "%{text}",
    hover: str | None = None,
    colorbar_title: str | None = None,
    customdata=None,
    **trace,
) -> go.Heatmap:
    """A heatmap trace in the palette: sequential (0..max) or diverging (symmetric around 0)."""
    values = _cells(z)
    if diverging and zmin is None and zmax is None:
        finite = np.asarray(values, dtype=float)
        top = float(np.nanmax(np.abs(finite))) if np.isfinite(finite).any() else 1.0
        zmin, zmax = -(top or 1.0), top or 1.0
    return go.Heatmap(
        z=values,
        x=x,
        y=y,
        zmin=zmin,
        zmax=zmax,
        zmid=0 if diverging else None,
        colorscale=DIVERGING if diverging else SEQUENTIAL,
        text=text,
        texttemplate=text_format if text is not None else None,
        hovertemplate=hover,
        customdata=customdata,
        colorbar={"title": {"text": colorbar_title}} if colorbar_title else None,
        **trace,
    )


def heatmap(
    z,
    *,
    x=None,
    y=None,
    title: str | None = None,
    x_title: str | None = None,
    y_title: str | None = None,
    height: int | None = None,
    width: int | None = None,
    **trace,
) -> go.Figure:
    """A heatmap figure: rows top to bottom as given, one height rule, the palette (see `heatmap_trace`)."""
    fig = figure(title)
    fig.add_trace(heatmap_trace(z, x=x, y=y, **trace))
    n_rows = len(np.asarray(z)) if z is not None else 1
    fig.update_layout(
        xaxis={"title": x_title},
        yaxis={"title": y_title, "autorange": "reversed", "showgrid": False},
        height=height or heatmap_height(n_rows),
        width=width,
    )
    return fig


def heatmap_grid(
    zs: Sequence, titles: Sequence[str], *, cols: int = 8, title: str | None = None, cell_px: int = 150
) -> go.Figure:
    """Small heatmaps on one shared colour axis (e.g. every head of a layer), `cols` to a row."""
    cols = max(1, min(cols, len(zs)))
    rows = math.ceil(len(zs) / cols)
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=list(titles), horizontal_spacing=0.02, vertical_spacing=0.08
    )
    for i, (z, name) in enumerate(zip(zs, titles)):
        fig.add_trace(
            go.Heatmap(
                z=_cells(z),
                coloraxis="coloraxis",
                hovertemplate=f"{escape_label(name)}<br>%{{y}} → %{{x}}<br>%{{z:.3f}}<extra></extra>",
            ),
            row=i // cols + 1,
            col=i % cols + 1,
        )
    fig.update_xaxes(showticklabels=False, showgrid=False, ticks="")
    fig.update_yaxes(showticklabels=False, showgrid=False, ticks="", autorange="reversed")
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        coloraxis={"colorscale": SEQUENTIAL, "cmin": 0, "cmax": 1, "showscale": False},
        height=40 + cell_px * rows,
        width=40 + cell_px * cols,
        margin={"l": 10, "r": 10, "t": 50, "b": 10},
    )
    return fig


# ------------------------------------------------------------------------------------- showing figures
def mimebundle(fig: go.Figure) -> dict:
    """The figure as plotly's mime bundle (what the notebook stores): data and layout, never the library."""
    data = json.loads(pio.to_json(fig, validate=False))
    title = (fig.layout.title.text or "plotly figure") if fig.layout.title else "plotly figure"
    return {"application/vnd.plotly.v1+json": data, "text/plain": f"<Figure: {title}>"}


class OutputSlot:
    """One cell output of a view, redrawn in place through its display id (the base of the two kinds below).

    Why not an ipywidgets `Output`: JupyterLab draws a widget only through a kernel (jupyterlab_widgets loads
    saved widget state from the kernel, ipywidgets issue 3773), so a saved notebook reopened without one
    showed "Loading widget..." where every figure had been. A plain display_data output is stored in the cell
    and drawn by any front end with or without a kernel; while the kernel lives, `update_display` (what a
    control's callback sends) redraws it: JupyterLab keeps each cell's execute request open for display
    updates, and nbclient and VS Code follow display ids too. A slot shown twice is redrawn in both places.

    `add_class(name)` names the slot's role (e.g. "wb-pattern"): it travels in the output's metadata
    (`{"workbench": {"classes": [...]}}`), which the offline HTML export turns into CSS classes.
    """

    def __init__(self) -> None:
        self.display_id = uuid.uuid4().hex
        self.classes: list[str] = []
        self.displayed = False

    def bundle(self) -> dict:
        raise NotImplementedError

    def add_class(self, name: str) -> None:
        if name not in self.classes:
            self.classes.append(name)
            self.refresh()

    @property
    def metadata(self) -> dict:
        return {"workbench": {"classes": list(self.classes)}} if self.classes else {}

    @property
    def outputs(self) -> tuple[dict, ...]:
        """The slot as the notebook stores it (one display_data output)."""
        return ({"output_type": "display_data", "data": self.bundle(), "metadata": self.metadata},)

    def _ipython_display_(self) -> None:
        display(self.bundle(), raw=True, metadata=self.metadata, display_id=self.display_id)
        self.displayed = True

    def refresh(self) -> None:
        """Redraw every place the slot is shown (nothing to do before it is displayed)."""
        if self.displayed:
            update_display(self.bundle(), raw=True, metadata=self.metadata, display_id=self.display_id)


class FigureView(OutputSlot):
    """A figure as a cell output of plotly's mime type: the saved notebook keeps its last state.

    `show(fig)` replaces what is drawn; `figure` is the go.Figure on screen (`.data`, `.layout` read it).
    """

    def __init__(self, fig: go.Figure | None = None) -> None:
        super().__init__()
        self.figure = figure() if fig is None else fig

    def show(self, fig: go.Figure) -> None:
        self.figure = fig
        self.refresh()

    def bundle(self) -> dict:
        return mimebundle(self.figure)

    def refresh(self) -> None:
        # plotly's JupyterLab renderer ignores a new model once it has drawn ("we already have a graph, don't
        # overwrite it"), and JupyterLab reuses the renderer when the mime type stays the same: pass through
        # plain text first so that JupyterLab makes a fresh plotly renderer for the new figure.
        if self.displayed:
            update_display({"text/plain": "redrawing…"}, raw=True, display_id=self.display_id)
        super().refresh()

    @property
    def data(self):
        return self.figure.data

    @property
    def layout(self):
        return self.figure.layout


class HTMLView(OutputSlot):
    """HTML (a table, a token view) as a cell output: set `value` as on a `widgets.HTML` to redraw it."""

    def __init__(self, value: str = "") -> None:
        super().__init__()
        self._value = value

    @property
    def value(self) -> str:
        return self._value

    @value.setter
    def value(self, value: str) -> None:
        self._value = value
        self.refresh()

    def bundle(self) -> dict:
        text = html.unescape(re.sub(r"<[^>]+>", " ", self._value))
        classes = " ".join(["wb-output", *self.classes])
        return {
            "text/html": f'<div class="{classes}">{self._value}</div>',
            "text/plain": " ".join(text.split()),
        }


class ViewLayout:
    """A view shown as cell outputs in order: each run of widgets (the controls) one box with the view's CSS
    class, each `OutputSlot` (its figures and results) an output of its own, so that they still draw when the
    notebook is reopened without a kernel (see `OutputSlot`)."""

    def __init__(self, parts: Sequence, css_class: str) -> None:
        self.children = list(parts)
        self.groups: list = []
        for part in self.children:
            if isinstance(part, OutputSlot):
                self.groups.append(part)
            elif self.groups and isinstance(self.groups[-1], widgets.VBox):
                self.groups[-1].children += (part,)
            else:
                box = widgets.VBox([part])
                box.add_class(css_class)
                self.groups.append(box)

    @property
    def boxes(self) -> list[widgets.VBox]:
        """The widget boxes (the controls), in order."""
        return [g for g in self.groups if isinstance(g, widgets.VBox)]

    @property
    def slots(self) -> list[OutputSlot]:
        return [g for g in self.groups if isinstance(g, OutputSlot)]

    def _ipython_display_(self) -> None:
        for group in self.groups:
            display(group)
