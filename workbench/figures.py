"""The one place the workbench draws with plotly: palette, template, heatmaps, token labels, figure views.

Every analysis returns a `go.Figure` built here, and every widget shows figures through `FigureView`: a
`widgets.Output` holding the figure as plotly's own mime type (`application/vnd.plotly.v1+json`). The
JupyterLab extension bundled with plotly (and VS Code's notebook renderers) draw that type offline, and a
saved notebook stores only the figure's data, never the plotly.js library (a `go.FigureWidget` stores
~4.7 MB of JavaScript per widget in the saved widget state). Numbers travel as base64 typed arrays (plotly's
own JSON).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

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
def escape_label(text: str) -> str:
    """Text safe inside a plotly label or HTML: plotly reads `<s>` as a tag and `&lt;` as an entity."""
    return html.escape(str(text), quote=False)


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


class FigureView(widgets.Output):
    """A figure inside a widget, shown as plotly's mime type: the saved notebook keeps its last state.

    `show(fig)` replaces what is drawn; `figure` is the go.Figure on screen (`.data`, `.layout` read it).
    The output is set from the kernel (not captured from the front end), so it works in callbacks, under
    nbclient and in any front end that renders Output widgets.
    """

    def __init__(self, fig: go.Figure | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.figure = figure()
        if fig is not None:
            self.show(fig)

    def show(self, fig: go.Figure) -> None:
        self.figure = fig
        bundle = mimebundle(fig)
        self.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)

    @property
    def data(self):
        return self.figure.data

    @property
    def layout(self):
        return self.figure.layout
