"""The attention explorer and the head summary: where each head attends, and which heads do what.

`AttentionExplorer(model, prompt)` shows one head's pattern as a heatmap (tokens on both axes), every head of
the layer as small heatmaps, and a token view (where the chosen token attends, what attends to it). The model
runs once per prompt (the rotated queries and keys are cached, see `workbench.attention`); layer, head, window
and token controls only recompute the on-screen pattern and update the figures in place.

`HeadSummary(model, input, explorer=...)` scores every head (previous-token, duplicate-token, induction) as a
table and a layer x head heatmap; clicking a cell, or choosing a head and pressing "open", shows that head in
the explorer. Both render offline: plotly's FigureWidget ships its JavaScript in the Python package.
"""

from __future__ import annotations

import html
import math
import operator
from collections import OrderedDict

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from workbench.attention import (
    SCORE_TITLES,
    SCORES,
    PromptAttention,
    attention_pattern,
    cache_attention,
    head_scores,
    head_scores_figure,
    single_prompt_tokens,
)
from workbench.hooked_model import HookedApertus
from workbench.widgets.tokens import colored_tokens_html

PATTERN_COLORS = "Blues"


class AttentionExplorer:
    """One head's attention pattern on a prompt, the layer's other heads, and a per-token view.

    Controls (ipywidgets, settable from code): `prompt_box` + `run_button`, `layer`, `head`, `window` (first
    query shown, for prompts longer than `window_size`), `token` (position for the token view). Figures:
    `figure` (the selected head, a `go.FigureWidget`), `grid` (all heads of the layer). `state` summarises
    the view; `model_runs` counts forward passes (one per new prompt). Display it as any widget.
    """

    def __init__(
        self,
        model: HookedApertus,
        prompt: str | torch.Tensor | None = None,
        *,
        layer: int = 0,
        head: int = 0,
        window_size: int = 64,
        cached_prompts: int = 4,
    ) -> None:
        if window_size < 2:
            raise ValueError(f"window_size must be at least 2 tokens; got {window_size}.")
        self.model = model
        self.window_size = window_size
        self.model_runs = 0
        self._forwards: OrderedDict[str | tuple, PromptAttention] = OrderedDict()
        self._cached_prompts = max(1, cached_prompts)
        self._attention: PromptAttention | None = None
        self._layer_pattern: tuple[tuple, torch.Tensor] | None = None  # ((layer, window start), [head, q, k])
        self._quiet = False
        self._grid_shows: tuple | None = None  # the (layer, window start) the head grid is drawn for
        cfg = model.cfg

        self.prompt_box = widgets.Textarea(
            value=prompt if isinstance(prompt, str) else "",
            placeholder="Type a prompt, then press Run",
            layout=widgets.Layout(width="100%", height="4em"),
        )
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.layer = widgets.Dropdown(
            options=[(f"layer {i}", i) for i in range(cfg.n_layers)],
            value=model.check_layer(_as_int(layer)),
            description="layer",
            layout=widgets.Layout(width="160px"),
        )
        self.head = widgets.Dropdown(
            options=[(f"head {h}", h) for h in range(cfg.n_heads)],
            value=model.check_head(_as_int(head)),
            description="head",
            layout=widgets.Layout(width="160px"),
        )
        self.window = widgets.IntSlider(
            value=0,
            min=0,
            max=0,
            description="from query",
            continuous_update=False,
            layout=widgets.Layout(width="420px"),
        )
        self.token = widgets.Dropdown(options=[], description="token", layout=widgets.Layout(width="220px"))
        self.kv_label = widgets.HTML()
        self.status = widgets.HTML()
        self.attends_to = widgets.HTML()
        self.attended_by = widgets.HTML()
        for control, css in [
            (self.layer, "wb-layer"),
            (self.head, "wb-head"),
            (self.window, "wb-window"),
            (self.token, "wb-token"),
            (self.run_button, "wb-run"),
            (self.prompt_box, "wb-prompt"),
        ]:
            control.add_class(css)

        self.figure = go.FigureWidget(_pattern_figure())
        self.grid = go.FigureWidget(_grid_figure(cfg.n_heads, cfg.n_key_value_heads))
        self.figure.data[0].on_click(self._pattern_clicked)
        for trace in self.grid.data:
            trace.on_click(self._grid_clicked)

        self.run_button.on_click(lambda _: self._run_from_box())
        self.layer.observe(lambda _: self._refresh(), names="value")
        self.head.observe(lambda _: self._refresh(), names="value")
        self.window.observe(lambda _: self._window_moved(), names="value")
        self.token.observe(lambda _: self._refresh_tokens(), names="value")

        self.widget = widgets.VBox(
            [
                widgets.HBox([self.prompt_box, self.run_button], layout=widgets.Layout(width="100%")),
                widgets.HBox([self.layer, self.head, self.kv_label, self.window]),
                self.status,
                self.figure,
                widgets.HTML("<b>All heads of this layer</b> (click one to select it)"),
                self.grid,
                widgets.HBox([self.token]),
                self.attends_to,
                self.attended_by,
            ]
        )
        self.widget.add_class("wb-attention-explorer")
        self._refresh_kv_label()
        if prompt is not None:  # a token tensor has no truth value: test for None, not emptiness
            self.run(prompt)

    # ------------------------------------------------------------------------------------------- public
    def run(self, prompt: str | torch.Tensor) -> None:
        """Show `prompt`, a text or token ids [pos] (one forward pass when first seen, then cached)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("The prompt is empty: type some text in the box (or pass a non-empty str).")
            key, text = prompt, prompt
        else:
            tokens = single_prompt_tokens(self.model, prompt)
            key, text = tuple(tokens.tolist()), self.model.to_string(tokens)
        if key in self._forwards:
            self._forwards.move_to_end(key)
        else:
            self._forwards[key] = cache_attention(self.model, prompt)
            self.model_runs += 1
            while len(self._forwards) > self._cached_prompts:
                self._forwards.popitem(last=False)
        self._attention = self._forwards[key]
        self._layer_pattern = self._grid_shows = None
        self._quiet = True
        try:
            if self.prompt_box.value != text:
                self.prompt_box.value = text
            n = self._attention.n_tokens
            self.window.max = max(0, n - self.window_size)
            self.window.value = 0
            self.window.layout.display = None if n > self.window_size else "none"
        finally:
            self._quiet = False
        self._reset_tokens()
        self._refresh()

    def show(self, layer: int | None = None, head: int | None = None, token: int | None = None) -> None:
        """Select a layer, head and/or token position (as if the controls were set by hand)."""
        self._quiet = True
        try:
            # Heads picked from a DataFrame index arrive as numpy integers.
            if layer is not None:
                self.layer.value = self.model.check_layer(_as_int(layer))
            if head is not None:
                self.head.value = self.model.check_head(_as_int(head))
        finally:
            self._quiet = False
        if token is not None:
            self._select_token(_as_int(token))
        self._refresh()

    @property
    def attention(self) -> PromptAttention:
        if self._attention is None:
            raise RuntimeError(
                "No prompt yet: type one in the box and press Run, or call explorer.run(prompt)."
            )
        return self._attention

    @property
    def queries(self) -> range:
        """The query (and key) positions on screen."""
        n = self.attention.n_tokens
        start = min(self.window.value, max(0, n - self.window_size))
        return range(start, min(n, start + self.window_size))

    @property
    def pattern(self) -> np.ndarray:
        """The selected head's pattern on screen [query, key] (future positions NaN)."""
        return self._layer_patterns()[self.head.value].numpy()

    @property
    def state(self) -> dict:
        attention = self.attention
        return {
            "prompt": self.prompt_box.value,
            "n_tokens": attention.n_tokens,
            "layer": self.layer.value,
            "head": self.head.value,
            "kv_group": attention.kv_group(self.head.value),
            "queries": self.queries,
            "token": self.token.value,
            "model_runs": self.model_runs,
        }

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # ----------------------------------------------------------------------------------------- internals
    def _run_from_box(self) -> None:
        try:
            self.run(self.prompt_box.value)
        except (ValueError, IndexError, TypeError) as error:
            # A button callback's exception would vanish into the log console: show it where the user looks.
            self.status.value = f'<span style="color:#b2182b">{html.escape(str(error))}</span>'

    def _layer_patterns(self) -> torch.Tensor:
        """All heads of the selected layer on the window, computed once per (layer, window)."""
        key = (self.layer.value, self.queries.start)
        if self._layer_pattern is None or self._layer_pattern[0] != key:
            rows = self.queries
            pattern = attention_pattern(self.attention, self.layer.value, queries=rows, keys=rows)
            future = torch.arange(len(rows))[None, :] > torch.arange(len(rows))[:, None]
            self._layer_pattern = (key, pattern.masked_fill(future, float("nan")))
        return self._layer_pattern[1]

    def _refresh(self) -> None:
        if self._quiet:
            return
        self._refresh_kv_label()
        if self._attention is None:
            return
        attention, rows = self.attention, self.queries
        patterns = self._layer_patterns()
        labels = attention.str_tokens[rows.start : rows.stop]
        positions = list(rows)
        layer, head = self.layer.value, self.head.value
        # In a window of a long prompt most attention lands outside it (often on <s>): on a fixed 0..1 scale
        # the window would look empty, so the colour scale then runs to the largest weight shown.
        windowed = len(rows) < attention.n_tokens
        top = float(torch.nan_to_num(patterns[head], nan=0.0).max()) if windowed else 1.0
        grid_top = float(torch.nan_to_num(patterns, nan=0.0).max()) if windowed else 1.0
        with self.figure.batch_update():
            trace = self.figure.data[0]
            trace.z = _heatmap_cells(patterns[head])
            trace.zmax = max(top, 1e-6)
            trace.x = positions
            trace.y = positions
            for axis in (self.figure.layout.xaxis, self.figure.layout.yaxis):
                axis.tickvals = positions
                axis.ticktext = [html.escape(t) for t in labels]  # plotly reads "<s>" as a tag
            scale = f"; colours up to {top:.2g}" if windowed else ""
            self.figure.layout.title.text = (
                f"Layer {layer}, head {head} (reads KV head {attention.kv_group(head)}){scale}"
            )
            size = max(360, min(760, 140 + 16 * len(rows)))
            self.figure.layout.height = size
            self.figure.layout.width = size + 120
        if self._grid_shows != self._layer_pattern[0]:
            self._update_grid(patterns, positions, grid_top, layer)
        shown = f"tokens {rows.start}..{rows.stop - 1} of {attention.n_tokens}"
        self.status.value = (
            f"{attention.n_tokens} tokens; showing {shown}. Model runs so far: {self.model_runs} "
            "(one per new prompt; the view only recomputes the pattern on screen)."
        )
        self._refresh_tokens()

    def _update_grid(self, patterns: torch.Tensor, positions: list[int], top: float, layer: int) -> None:
        self._grid_shows = self._layer_pattern[0]
        with self.grid.batch_update():
            for h, trace in enumerate(self.grid.data):
                trace.z = _heatmap_cells(patterns[h])
                trace.x = positions
                trace.y = positions
            self.grid.layout.coloraxis.cmax = max(top, 1e-6)
            self.grid.layout.title.text = f"Layer {layer}: all {len(patterns)} heads"

    def _refresh_kv_label(self) -> None:
        cfg = self.model.cfg
        group_size = cfg.n_heads // cfg.n_key_value_heads
        group = self.head.value // group_size
        sharing = ", ".join(str(h) for h in range(group * group_size, (group + 1) * group_size))
        self.kv_label.value = (
            f"<span style='padding:0 8px'>reads <b>KV head {group}</b> of {cfg.n_key_value_heads} "
            f"(shared by heads {sharing})</span>"
        )

    def _window_moved(self) -> None:
        if self._quiet or self._attention is None:
            return
        self._reset_tokens()
        self._refresh()

    def _reset_tokens(self) -> None:
        rows = self.queries
        tokens = self.attention.str_tokens
        options = [(f"{i}: {tokens[i]!r}", i) for i in rows]
        self._quiet = True
        try:
            self.token.options = options
            self.token.value = rows.stop - 1
        finally:
            self._quiet = False

    def _select_token(self, position: int) -> None:
        rows = self.queries
        if position not in rows:
            raise IndexError(
                f"token {position} is not on screen (positions {rows.start}..{rows.stop - 1}): "
                "move the window first."
            )
        self.token.value = position

    def _refresh_tokens(self) -> None:
        if self._quiet or self._attention is None or self.token.value is None:
            return
        rows = self.queries
        labels = self.attention.str_tokens[rows.start : rows.stop]
        pattern = np.nan_to_num(self.pattern)
        i = self.token.value - rows.start
        tok = html.escape(repr(labels[i]))
        row, column = pattern[i], pattern[:, i]
        self.attends_to.value = (
            f"<div><b>Where {tok} (position {self.token.value}) attends</b></div>"
            + colored_tokens_html(labels, row.tolist(), selected=i, titles=_titles(rows, labels, row))
        )
        self.attended_by.value = f"<div><b>What attends to {tok}</b></div>" + colored_tokens_html(
            labels, column.tolist(), selected=i, titles=_titles(rows, labels, column)
        )

    def _pattern_clicked(self, trace, points, state) -> None:
        if points.point_inds:
            query, _ = points.point_inds[0]
            self._select_token(self.queries.start + query)

    def _grid_clicked(self, trace, points, state) -> None:
        if points.point_inds:
            self.head.value = self.grid.data.index(trace)


def _heatmap_cells(pattern: torch.Tensor) -> list[list[float | None]]:
    # Future positions become null (a blank cell): NaN would break the widget's JSON messages.
    cells = pattern.numpy().astype(object)
    cells[np.isnan(pattern.numpy())] = None
    return cells.tolist()


def _as_int(value):
    try:
        return operator.index(value)
    except TypeError:
        return value  # not an integer: let the model's check name the problem


def _titles(rows: range, labels: list[str], values: np.ndarray) -> list[str]:
    return [f"{p} {t!r}: {v:.3f}" for p, t, v in zip(rows, labels, values)]


def _pattern_figure() -> go.Figure:
    fig = go.Figure(
        go.Heatmap(
            z=[[0.0]],
            zmin=0,
            zmax=1,
            colorscale=PATTERN_COLORS,
            hovertemplate="query %{y} → key %{x}<br>attention %{z:.3f}<extra></extra>",
            colorbar={"title": {"text": "attention"}},
        )
    )
    fig.update_layout(
        title="Run a prompt to see its attention",
        xaxis={"title": "key (attended to)", "tickmode": "array", "tickangle": -60, "showgrid": False},
        yaxis={"title": "query (attending)", "tickmode": "array", "autorange": "reversed", "showgrid": False},
        margin={"l": 90, "r": 20, "t": 50, "b": 90},
        height=420,
        width=540,
        plot_bgcolor="white",  # the blank future (upper triangle) stays blank
    )
    return fig


def _grid_figure(n_heads: int, n_kv_heads: int) -> go.Figure:
    cols = min(n_heads, 8)
    rows = math.ceil(n_heads / cols)
    group_size = n_heads // n_kv_heads
    titles = [f"H{h} · KV {h // group_size}" for h in range(n_heads)]
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.02, vertical_spacing=0.08
    )
    for h in range(n_heads):
        fig.add_trace(
            go.Heatmap(
                z=[[0.0]],
                coloraxis="coloraxis",
                hovertemplate=f"head {h}<br>query %{{y}} → key %{{x}}<br>%{{z:.3f}}<extra></extra>",
            ),
            row=h // cols + 1,
            col=h % cols + 1,
        )
    fig.update_xaxes(showticklabels=False, showgrid=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, autorange="reversed")
    fig.update_layout(
        plot_bgcolor="white",
        coloraxis={"colorscale": PATTERN_COLORS, "cmin": 0, "cmax": 1, "showscale": False},
        height=40 + 150 * rows,
        width=40 + 150 * cols,
        margin={"l": 10, "r": 10, "t": 50, "b": 10},
        title="All heads",
    )
    return fig


class HeadSummary:
    """Every head's previous-token, duplicate-token and induction score: a table and a layer x head heatmap.

    `scores` is the DataFrame of `workbench.attention.head_scores`; `figure` the heatmap of the score chosen
    in `score`. Clicking a cell, or choosing a head in `head` and pressing `open_button`, shows it in
    `explorer`.
    """

    def __init__(
        self,
        model: HookedApertus,
        input: str | list[str] | torch.Tensor | None = None,
        *,
        explorer: AttentionExplorer | None = None,
        scores: pd.DataFrame | None = None,
        score: str = "induction",
    ) -> None:
        if scores is None and input is None:
            raise ValueError("Give the prompt(s) to score heads on (input=...), or precomputed scores=....")
        if score not in SCORES:
            raise ValueError(f"Unknown score {score!r}: choose one of {', '.join(SCORES)}.")
        self.model = model
        self.explorer = explorer
        self.scores = head_scores(model, input) if scores is None else scores
        self.score = widgets.Dropdown(
            options=[(SCORE_TITLES[s], s) for s in SCORES], value=score, description="score"
        )
        self.head = widgets.Dropdown(description="head", layout=widgets.Layout(width="260px"))
        self.open_button = widgets.Button(
            description="open in explorer", icon="search", disabled=explorer is None
        )
        self.table = widgets.HTML(self.scores.round(3).to_html())
        self.figure = go.FigureWidget(head_scores_figure(self.scores, score))
        self.figure.data[0].on_click(self._clicked)
        for control, css in [
            (self.score, "wb-score"),
            (self.head, "wb-summary-head"),
            (self.open_button, "wb-open"),
        ]:
            control.add_class(css)
        self.score.observe(lambda _: self._refresh(), names="value")
        self.open_button.on_click(lambda _: self.open(*self.head.value))
        self.widget = widgets.VBox(
            [widgets.HBox([self.score, self.head, self.open_button]), self.figure, self.table]
        )
        self.widget.add_class("wb-head-summary")
        self._refresh()

    def top(self, score: str = "induction", n: int = 3) -> pd.DataFrame:
        """The `n` heads with the highest `score`."""
        if score not in SCORES:
            raise ValueError(f"Unknown score {score!r}: choose one of {', '.join(SCORES)}.")
        return self.scores.sort_values(score, ascending=False).head(n)

    def open(self, layer: int, head: int) -> None:
        """Show (layer, head) in the linked explorer."""
        if self.explorer is None:
            raise RuntimeError(
                "This summary has no explorer to open heads in: pass explorer=AttentionExplorer(...)."
            )
        self.explorer.show(layer=layer, head=head)

    def _refresh(self) -> None:
        name = self.score.value
        fresh = head_scores_figure(self.scores, name)
        with self.figure.batch_update():
            self.figure.data[0].z = fresh.data[0].z
            self.figure.data[0].text = fresh.data[0].text
            self.figure.layout.title.text = fresh.layout.title.text
        ranked = self.scores[name].sort_values(ascending=False, na_position="last")
        previous = self.head.value
        self.head.options = [
            (f"layer {layer} head {head} ({value:.2f})", (int(layer), int(head)))
            for (layer, head), value in ranked.items()
        ]
        self.head.value = previous if previous in ranked.index else self.head.options[0][1]

    def _clicked(self, trace, points, state) -> None:
        if points.point_inds:
            row, col = points.point_inds[0]
            grid = self.scores[self.score.value].unstack("head")
            layer, head = grid.index[row], grid.columns[col]
            self.head.value = (int(layer), int(head))
            if self.explorer is not None:
                self.open(int(layer), int(head))

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
