"""The attention explorer and the head summary: where each head attends, and which heads do what.

`AttentionExplorer(model, prompt)` shows one head's pattern as a heatmap (tokens on both axes) with a last
column holding, per query row, the attention that falls on keys not drawn; every head of the layer as small
heatmaps; and a token view (where the chosen token attends, what attends to it, and the top keys it reads over
the whole prompt). The model runs once per prompt (the rotated queries and keys are cached, see
`workbench.attention`); layer, head, window and token controls only recompute the on-screen pattern.

On a long prompt the query window and the key window move separately: by default the keys follow the queries,
and the first `pinned` columns (BOS, where much attention goes) are always drawn; move "from key" to look at
keys far before the queries.

`HeadSummary(model, input, explorer=...)` scores every head (previous-token, duplicate-token, induction) as a
table and a layer x head heatmap; choosing a head and pressing "open" shows that head in the explorer.

Figures and results are cell outputs of their own below the controls (`workbench.figures.FigureView`,
`HTMLView`: plotly's mime type and HTML, redrawn in place): they render offline, also in a saved notebook
reopened without a kernel, which keeps their last state and stores no JavaScript. Choose with the controls,
not by clicking.
"""

from __future__ import annotations

import html
import operator
from collections import OrderedDict

import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch

from workbench import figures
from workbench.attention import (
    SCORE_TITLES,
    SCORES,
    PromptAttention,
    attention_pattern,
    attention_window,
    cache_attention,
    head_scores,
    head_scores_figure,
    single_prompt_tokens,
    top_keys,
    window_figure,
)
from workbench.hooked_model import HookedApertus
from workbench.widgets.controls import Choice, IntSlider, Switch, TextArea
from workbench.widgets.tokens import colored_tokens_html

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # cached queries and keys across prompts (one prompt is always kept)


class AttentionExplorer:
    """One head's attention pattern on a prompt, the layer's other heads, and a per-token view.

    Controls (ipywidgets, settable from code): `prompt_box` + `run_button`, `layer`, `head`, `window` (first
    query shown, for prompts longer than `window_size`), `key_window` (first key shown) with `follow` (keys
    follow the queries), `token` (position for the token view). Figures: `figure` (the selected head, with
    the outside-mass column) and `grid` (all heads of the layer). `outside` and `top_keys` give the numbers
    behind them; `state` summarises the view; `model_runs` counts forward passes (one per new prompt).

    Memory: cached prompts keep their queries and keys in the model's dtype; the oldest are dropped beyond
    `cached_prompts` or `memory_budget` bytes (the prompt on screen always stays).
    """

    def __init__(
        self,
        model: HookedApertus,
        prompt: str | torch.Tensor | None = None,
        *,
        layer: int = 0,
        head: int = 0,
        window_size: int = 64,
        pinned: int = 1,
        top_k: int = 10,
        cached_prompts: int = 4,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        if window_size < 2:
            raise ValueError(f"window_size must be at least 2 tokens; got {window_size}.")
        if pinned < 0 or top_k < 1:
            raise ValueError(f"pinned must be >= 0 and top_k >= 1; got pinned={pinned}, top_k={top_k}.")
        self.model = model
        self.window_size, self.pinned, self.top_k = window_size, pinned, top_k
        self.memory_budget = memory_budget
        self.model_runs = 0
        self._forwards: OrderedDict[str | tuple, PromptAttention] = OrderedDict()
        self._cached_prompts = max(1, cached_prompts)
        self._attention: PromptAttention | None = None
        self._layer_view: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (key, pattern, outside)
        self._quiet = False
        self._grid_shows: tuple | None = None  # the view key the head grid is drawn for
        cfg = model.cfg

        self.prompt_box = TextArea(
            what="prompt_box",
            value=prompt if isinstance(prompt, str) else "",
            placeholder="Type a prompt, then press Run",
            layout=widgets.Layout(width="100%", height="4em"),
        )
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.layer = Choice(
            what="layer",
            options=[(f"layer {i}", i) for i in range(cfg.n_layers)],
            value=model.check_layer(_as_int(layer)),
            description="layer",
            layout=widgets.Layout(width="160px"),
        )
        self.head = Choice(
            what="head",
            options=[(f"head {h}", h) for h in range(cfg.n_heads)],
            value=model.check_head(_as_int(head)),
            description="head",
            layout=widgets.Layout(width="160px"),
        )
        slider = {"value": 0, "min": 0, "max": 0, "continuous_update": False}
        self.window = IntSlider(
            what="window",
            hint=" (the first query position shown, up to the prompt's length - window_size)",
            description="from query",
            layout=widgets.Layout(width="420px"),
            **slider,
        )
        self.key_window = IntSlider(
            what="key_window",
            hint=" (the first key position shown, up to the prompt's length - window_size)",
            description="from key",
            layout=widgets.Layout(width="420px"),
            **slider,
        )
        self.follow = Switch(what="follow", value=True, description="keys follow queries", indent=False)
        self.token = Choice(
            what="token",
            hint=" (the query positions on screen: move the window to reach others)",
            options=[],
            description="token",
            layout=widgets.Layout(width="220px"),
        )
        self.kv_label = widgets.HTML()
        self.status = widgets.HTML()
        self.attends_to = figures.HTMLView()
        self.attended_by = figures.HTMLView()
        self.looks = figures.HTMLView()
        self.figure = figures.FigureView()
        self.grid = figures.FigureView()
        for control, css in [
            (self.layer, "wb-layer"),
            (self.head, "wb-head"),
            (self.window, "wb-window"),
            (self.key_window, "wb-key-window"),
            (self.follow, "wb-follow"),
            (self.token, "wb-token"),
            (self.run_button, "wb-run"),
            (self.prompt_box, "wb-prompt"),
            (self.figure, "wb-pattern"),
            (self.grid, "wb-head-grid"),
            (self.looks, "wb-top-keys"),
        ]:
            control.add_class(css)

        self.run_button.on_click(lambda _: self._run_from_box())
        self.layer.observe(lambda _: self._refresh(), names="value")
        self.head.observe(lambda _: self._refresh(), names="value")
        self.window.observe(lambda _: self._window_moved(), names="value")
        self.key_window.observe(lambda _: self._keys_moved(), names="value")
        self.follow.observe(lambda _: self._window_moved(), names="value")
        self.token.observe(lambda _: self._refresh_tokens(), names="value")

        self.windows = widgets.HBox([self.window, self.key_window, self.follow])
        self.widget = figures.ViewLayout(
            [
                widgets.HBox([self.prompt_box, self.run_button], layout=widgets.Layout(width="100%")),
                widgets.HBox([self.layer, self.head, self.kv_label]),
                self.windows,
                self.status,
                self.figure,
                figures.HTMLView("<b>All heads of this layer</b> (choose one with the head control)"),
                self.grid,
                widgets.HBox([self.token]),
                self.looks,
                self.attends_to,
                self.attended_by,
            ],
            "wb-attention-explorer",
        )
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
            key = tuple(tokens.tolist())
            text = self.model.to_string(tokens) if self.model.tokenizer is not None else ""
        if key in self._forwards:
            self._forwards.move_to_end(key)
        else:
            self._forwards[key] = cache_attention(self.model, prompt)
            self.model_runs += 1
            self._evict()
        self._attention = self._forwards[key]
        self._layer_view = self._grid_shows = None
        self._quiet = True
        try:
            if self.prompt_box.value != text:
                self.prompt_box.value = text
            n = self._attention.n_tokens
            for slider in (self.window, self.key_window):
                slider.max = max(0, n - self.window_size)
                slider.value = 0
            self.follow.value = True
            self.windows.layout.display = None if n > self.window_size else "none"
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

    def show_keys(self, start: int) -> None:
        """Draw the key window from position `start` on, independently of the query window.

        `start` is any position of the prompt; one in the last `window_size` positions draws the last window
        (which holds it). Setting `key_window.value` directly accepts only the window starts the slider has.
        """
        start, n = _as_int(start), self.attention.n_tokens
        if not isinstance(start, int) or not 0 <= start < n:
            raise IndexError(f"key position {start!r} is outside the prompt: choose one in 0..{n - 1}.")
        self.key_window.value = min(start, self.key_window.max)

    @property
    def attention(self) -> PromptAttention:
        if self._attention is None:
            raise RuntimeError(
                "No prompt yet: type one in the box and press Run, or call explorer.run(prompt)."
            )
        return self._attention

    @property
    def cached_bytes(self) -> int:
        """Memory held by the cached prompts' queries and keys."""
        return sum(a.nbytes for a in self._forwards.values())

    @property
    def queries(self) -> range:
        """The query positions on screen."""
        return self._span(self.window.value)

    @property
    def keys(self) -> list[int]:
        """The key columns drawn: the first `pinned` positions and the key window (the query window when
        `follow` is on)."""
        window = self.queries if self.follow.value else self._span(self.key_window.value)
        first = range(min(self.pinned, self.attention.n_tokens))
        return sorted(set(first) | set(window))

    @property
    def pattern(self) -> np.ndarray:
        """The selected head's pattern on screen [query, key column] (future positions NaN)."""
        pattern = self._layer_views()[1][self.head.value]
        future = torch.tensor(self.keys)[None, :] > torch.tensor(list(self.queries))[:, None]
        return pattern.masked_fill(future, float("nan")).numpy()

    @property
    def outside(self) -> np.ndarray:
        """Per query row on screen, the selected head's attention on keys not drawn (the last column)."""
        return self._layer_views()[2][self.head.value].numpy()

    @property
    def top_keys(self) -> pd.DataFrame:
        """Where the chosen token looks: its `top_k` keys over the whole prompt (see `attention.top_keys`)."""
        return top_keys(self.attention, self.layer.value, self.head.value, self.token.value, self.top_k)

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
            "keys": self.keys,
            "token": self.token.value,
            "model_runs": self.model_runs,
        }

    def _ipython_display_(self) -> None:
        self.widget._ipython_display_()

    # ----------------------------------------------------------------------------------------- internals
    def _evict(self) -> None:
        """Drop the oldest prompts beyond the count or the memory budget; the newest always stays."""
        while len(self._forwards) > 1 and (
            len(self._forwards) > self._cached_prompts or self.cached_bytes > self.memory_budget
        ):
            self._forwards.popitem(last=False)

    def _span(self, start: int) -> range:
        n = self.attention.n_tokens
        start = min(start, max(0, n - self.window_size))
        return range(start, min(n, start + self.window_size))

    def _run_from_box(self) -> None:
        try:
            self.run(self.prompt_box.value)
        except (ValueError, IndexError, TypeError) as error:
            # A button callback's exception would vanish into the log console: show it where the user looks.
            self.status.value = figures.error_html(error)

    def _view_key(self) -> tuple:
        return (self.layer.value, self.queries.start, tuple(self.keys))

    def _layer_views(self) -> tuple[tuple, torch.Tensor, torch.Tensor]:
        """All heads of the selected layer on screen, computed once per (layer, query window, key columns)."""
        key = self._view_key()
        if self._layer_view is None or self._layer_view[0] != key:
            pattern, outside = attention_window(
                self.attention, self.layer.value, queries=self.queries, keys=self.keys
            )
            self._layer_view = (key, pattern, outside)
        return self._layer_view

    def _refresh(self) -> None:
        if self._quiet:
            return
        self._refresh_kv_label()
        if self._attention is None:
            return
        attention, rows, cols = self.attention, self.queries, self.keys
        key, patterns, outside = self._layer_views()
        layer, head = self.layer.value, self.head.value
        # In a window of a long prompt most attention may land outside it: on a fixed 0..1 scale the window
        # would look empty, so the colour scale then runs to the largest weight shown (the last column says
        # how much is not drawn).
        windowed = len(cols) < attention.n_tokens
        top = float(patterns[head].max()) if windowed else 1.0
        scale = f"; colours up to {top:.2g}" if windowed else ""
        title = f"Layer {layer}, head {head} (reads KV head {attention.kv_group(head)}){scale}"
        self.figure.show(
            window_figure(attention, patterns[head], outside[head], rows, cols, title=title, zmax=top)
        )
        if self._grid_shows != key:
            self._update_grid(patterns, rows, cols, float(patterns.max()) if windowed else 1.0, layer)
        self.status.value = (
            f"{attention.n_tokens} tokens; queries {rows.start}..{rows.stop - 1}, keys {_ranges(cols)}; "
            f"the last column is each row's attention on keys not drawn. Model runs so far: "
            f"{self.model_runs} (one per new prompt; the view only recomputes the pattern on screen)."
        )
        self._refresh_tokens()

    def _update_grid(
        self, patterns: torch.Tensor, rows: range, cols: list[int], top: float, layer: int
    ) -> None:
        self._grid_shows = self._layer_view[0]
        cfg = self.model.cfg
        group_size = cfg.n_heads // cfg.n_key_value_heads
        future = torch.tensor(cols)[None, :] > torch.tensor(list(rows))[:, None]
        cells = [p.masked_fill(future, float("nan")).numpy() for p in patterns]
        titles = [f"H{h} · KV {h // group_size}" for h in range(cfg.n_heads)]
        fig = figures.heatmap_grid(cells, titles, title=f"Layer {layer}: all {len(patterns)} heads")
        fig.update_layout(coloraxis_cmax=max(top, 1e-6))
        self.grid.show(fig)

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
        if self.follow.value:
            self._quiet = True
            try:
                self.key_window.value = self.queries.start
            finally:
                self._quiet = False
        self._reset_tokens()
        self._refresh()

    def _keys_moved(self) -> None:
        if self._quiet or self._attention is None:
            return
        self._quiet = True
        try:
            self.follow.value = False  # a key window moved by hand stays where it was put
        finally:
            self._quiet = False
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
        attention, rows, cols = self.attention, self.queries, self.keys
        tokens = attention.str_tokens
        position = self.token.value
        i = position - rows.start
        tok = html.escape(repr(tokens[position]))
        row = np.nan_to_num(self.pattern[i])
        key_labels = [tokens[c] for c in cols]
        selected = cols.index(position) if position in cols else None
        # The chosen token as a key, for every query row on screen (rows before it cannot see it: 0).
        column = attention_pattern(
            attention, self.layer.value, self.head.value, queries=rows, keys=[position]
        )[:, 0].numpy()
        labels = tokens[rows.start : rows.stop]
        self.attends_to.value = (
            f"<div><b>Where {tok} (position {position}) attends</b> among the keys drawn "
            f"({self.outside[i]:.1%} of its attention falls on other keys)</div>"
            + colored_tokens_html(
                key_labels, row.tolist(), selected=selected, titles=_titles(cols, key_labels, row)
            )
        )
        self.attended_by.value = f"<div><b>What attends to {tok}</b></div>" + colored_tokens_html(
            labels, column.tolist(), selected=i, titles=_titles(rows, labels, column)
        )
        self.looks.value = _top_keys_html(self.top_keys, tok, position)

    # Kept for notebooks that click programmatically: choose the token of a pattern row.
    def select_token(self, position: int) -> None:
        """Choose the token (query position on screen) for the token view."""
        self._select_token(_as_int(position))


def _top_keys_html(table: pd.DataFrame, tok: str, position: int) -> str:
    rows = "".join(
        f"<tr><td>{r.key}</td><td><code>{html.escape(repr(r.token))}</code></td>"
        f"<td style='text-align:right'>{r.attention:.3f}</td>"
        f"<td style='text-align:right'>{r.cumulative:.1%}</td></tr>"
        for r in table.itertuples()
    )
    return (
        f"<div><b>Where does {tok} (position {position}) look?</b> Its top {len(table)} keys over the whole "
        "prompt</div><table class='wb-top-keys-table'><tr><th>key</th><th>token</th><th>attention</th>"
        f"<th>cumulative</th></tr>{rows}</table>"
    )


def _ranges(cols: list[int]) -> str:
    """Key columns as runs: "0, 100..163"."""
    runs: list[list[int]] = []
    for c in cols:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def _as_int(value):
    try:
        return operator.index(value)
    except TypeError:
        return value  # not an integer: let the model's check name the problem


def _titles(positions, labels: list[str], values: np.ndarray) -> list[str]:
    return [f"{p} {t!r}: {v:.3f}" for p, t, v in zip(positions, labels, values)]


class HeadSummary:
    """Every head's previous-token, duplicate-token and induction score: a table and a layer x head heatmap.

    `scores` is the DataFrame of `workbench.attention.head_scores`; `figure` the heatmap of the score chosen
    in `score`. Choosing a head in `head` (ranked by the score) and pressing `open_button` shows it in
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
        self.score = Choice(
            what="score", options=[(SCORE_TITLES[s], s) for s in SCORES], value=score, description="score"
        )
        self.head = Choice(
            what="head",
            hint=" ((layer, head) pairs, ranked by the score)",
            description="head",
            layout=widgets.Layout(width="260px"),
        )
        self.open_button = widgets.Button(
            description="open in explorer", icon="search", disabled=explorer is None
        )
        self.table = figures.HTMLView(self.scores.round(3).to_html())
        self.figure = figures.FigureView(head_scores_figure(self.scores, score))
        self.figure.add_class("wb-head-scores")
        for control, css in [
            (self.score, "wb-score"),
            (self.head, "wb-summary-head"),
            (self.open_button, "wb-open"),
        ]:
            control.add_class(css)
        self.score.observe(lambda _: self._refresh(), names="value")
        self.open_button.on_click(lambda _: self.open(*self.head.value))
        self.widget = figures.ViewLayout(
            [widgets.HBox([self.score, self.head, self.open_button]), self.figure, self.table],
            "wb-head-summary",
        )
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
        self.figure.show(head_scores_figure(self.scores, name))
        ranked = self.scores[name].sort_values(ascending=False, na_position="last")
        previous = self.head.value
        self.head.options = [
            (f"layer {layer} head {head} ({value:.2f})", (int(layer), int(head)))
            for (layer, head), value in ranked.items()
        ]
        self.head.value = previous if previous in ranked.index else self.head.options[0][1]

    def _ipython_display_(self) -> None:
        self.widget._ipython_display_()
