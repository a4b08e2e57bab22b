"""A sweep's result, cell by cell: a table with statistics over prompt pairs, a grid, a plotly heatmap, files.

A result holds numbers and labels only (never the experiment, its caches or the model), so it saves as
kilobytes (`save`/`load`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch

from workbench import figures, statistics
from workbench.patching.components import Cell
from workbench.saved import load_result, save_result


@dataclass
class PatchResult:
    """One sweep's values, cell by cell: `.table`, `.grid()`, `.figure()`, `.save(path)`.

    `raw` is the metric of each patched run (the mean over prompt pairs); `values` is `raw` normalised
    (0 = corrupted run, 1 = clean run) when `normalized` is set, else `raw`. `per_pair` [cells, pairs] keeps
    each pair's metric and `base_per_pair` [pairs] the unpatched base run's, for the statistics in `.table`.
    """

    component: str
    metric: str
    direction: str
    method: str  # "exact" or "attribution"
    normalized: bool
    axes: tuple[str, ...]  # "layer" first, e.g. ("layer", "pos")
    cells: list[Cell]
    raw: torch.Tensor  # [len(cells)] float64
    clean_value: float
    corrupted_value: float
    str_tokens: list[str]
    sizes: dict[str, int]
    kv_groups: int = 1
    per_pair: torch.Tensor | None = None  # [cells, pairs] float64 ([cells, 1] for a scalar callable metric)
    base_per_pair: torch.Tensor | None = None  # [pairs]
    meta: dict[str, Any] = field(default_factory=dict, repr=False)  # model identity, prompts, answers

    @property
    def values(self) -> torch.Tensor:
        if not self.normalized:
            return self.raw
        return (self.raw - self.corrupted_value) / (self.clean_value - self.corrupted_value)

    def effects(self) -> torch.Tensor | None:
        """Each pair's change from its own unpatched base run [cells, pairs], normalised like `values`."""
        if self.per_pair is None or self.base_per_pair is None or self.per_pair.shape[1] < 2:
            return None
        effect = self.per_pair - self.base_per_pair[None]
        return effect / (self.clean_value - self.corrupted_value) if self.normalized else effect

    @property
    def table(self) -> pd.DataFrame:
        """One row per cell: its index columns (with the token at `pos`), `value`, `raw`, and the statistics
        of the per-pair effect (change from the base run): mean, std, ci_low, ci_high, p_value,
        ci_excludes_zero (method in `table.attrs["statistics"]`)."""
        frame = pd.DataFrame(self.cells, columns=list(self.axes))
        if "pos" in frame:
            frame.insert(
                frame.columns.get_loc("pos") + 1, "token", [self.str_tokens[p] for p in frame["pos"]]
            )
        if "kv_head" in frame:
            frame["query_heads"] = [
                ",".join(str(h) for h in range(k * self.kv_groups, (k + 1) * self.kv_groups))
                for k in frame["kv_head"]
            ]
        frame["value"] = self.values.tolist()
        frame["raw"] = self.raw.tolist()
        effects = self.effects()
        if effects is not None:
            stats = statistics.summary(effects)
            frame = pd.concat([frame, stats], axis=1)
            frame.attrs["statistics"] = statistics.method_note(effects.shape[1])
        return frame

    def top(self, k: int = 10) -> pd.DataFrame:
        """The k cells of largest |value|."""
        table = self.table
        return table.loc[table["value"].abs().sort_values(ascending=False).index[:k]].reset_index(drop=True)

    def grid(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """Values on the full grid, shaped by `axes` (NaN where a cell was not swept)."""
        shape = [self.sizes[a] for a in self.axes]
        out = torch.full(shape, float("nan"), dtype=torch.float64)
        for cell, value in zip(self.cells, (self.values if values is None else values).tolist()):
            out[cell] = value
        return out

    def heatmap_axes(self, values: torch.Tensor | None = None):
        """(z [rows, cols], row labels, column labels, the cell behind each entry) for a 2-D view."""
        grid, a = self.grid(values), self.axes
        layers = sorted({c[0] for c in self.cells})
        grid = grid[layers]
        if len(a) == 1:  # a whole hook point: one column
            return grid[:, None], [f"L{layer}" for layer in layers], ["all"], [[(layer,)] for layer in layers]
        if len(a) == 3:  # rows: layer x head (or layer x position, for SAE latents by position)
            mid = range(self.sizes[a[1]])
            tags = [f"H{i}" for i in mid] if a[1] == "head" else [f" {t}" for t in self._labels(a[1])]
            rows = [f"L{layer}{tag}" for layer in layers for tag in tags]
            cells = [[(layer, i, j) for j in range(self.sizes[a[2]])] for layer in layers for i in mid]
            return grid.flatten(0, 1), rows, self._labels(a[2]), cells
        cells = [[(layer, j) for j in range(self.sizes[a[1]])] for layer in layers]
        return grid, [f"L{layer}" for layer in layers], self._labels(a[1]), cells

    def _labels(self, axis: str) -> list[str]:
        n = self.sizes[axis]
        if axis == "pos":
            # Position first: plotly merges equal category labels, and a prompt repeats tokens.
            return [f"{p}:{self.str_tokens[p]}" for p in range(n)]
        prefix = {"head": "H", "kv_head": "KV", "neuron": "N", "latent": "F"}[axis]
        return [f"{prefix}{i}" for i in range(n)]

    def figure(self, title: str | None = None, mark_significant: bool = False) -> go.Figure:
        """A plotly heatmap (rows = layers, layer-heads or layer-positions; columns = tokens, heads, neurons
        or SAE latents "F<i>").

        mark_significant: draw a dot on every cell whose bootstrap interval excludes zero effect.
        """
        z, rows, cols, _ = self.heatmap_axes()
        what = "normalised " + self.metric if self.normalized else self.metric
        default = f"{self.method} patching, {self.direction}: {self.component} ({what})"
        fig = figures.heatmap(
            z.float().numpy(),
            x=[figures.escape_label(c) for c in cols],  # plotly reads "<s>" as a tag
            y=rows,
            diverging=True,
            colorbar_title=what,
            hover="%{y} %{x}<br>" + what + " %{z:.3f}<extra></extra>",
            title=title or default,
        )
        fig.update_layout(yaxis_type="category", xaxis={"type": "category", "tickangle": -45})
        if mark_significant and self.effects() is not None:
            flags = torch.tensor(self.table["ci_excludes_zero"].to_numpy(), dtype=torch.float64)
            marks, _, _, _ = self.heatmap_axes(flags)
            shown = [figures.escape_label(c) for c in cols]
            xs = [shown[j] for i in range(len(rows)) for j in range(len(cols)) if marks[i, j] == 1]
            ys = [rows[i] for i in range(len(rows)) for j in range(len(cols)) if marks[i, j] == 1]
            fig.add_trace(
                go.Scatter(
                    x=xs, y=ys, mode="markers", marker={"symbol": "circle", "size": 5, "color": "black"},
                    name="95% CI excludes 0", hoverinfo="skip",
                )
            )  # fmt: skip
        return fig

    # ----------------------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write `path` (.json: the per-pair values) and its `.meta.json` (what they are); no pickle."""
        per_pair = self.per_pair if self.per_pair is not None else self.raw[:, None]
        values = pd.DataFrame(self.cells, columns=list(self.axes))
        for j in range(per_pair.shape[1]):
            values[f"pair_{j}"] = per_pair[:, j].tolist()
        meta = {
            "component": self.component,
            "metric": self.metric,
            "direction": self.direction,
            "method": self.method,
            "normalized": self.normalized,
            "axes": list(self.axes),
            "clean_value": self.clean_value,
            "corrupted_value": self.corrupted_value,
            "str_tokens": self.str_tokens,
            "sizes": self.sizes,
            "kv_groups": self.kv_groups,
            "base_per_pair": None if self.base_per_pair is None else self.base_per_pair.tolist(),
            "per_pair_kept": self.per_pair is not None,
            **self.meta,
        }
        return save_result(path, "patch_result", meta, values)

    @classmethod
    def load(cls, path: str | Path) -> PatchResult:
        kind, meta, values = load_result(path)
        if kind != "patch_result":
            raise ValueError(f"{path} holds a {kind!r}, not a patching result.")
        axes = tuple(meta.pop("axes"))
        pair_columns = [c for c in values.columns if c.startswith("pair_")]
        per_pair = torch.tensor(values[pair_columns].to_numpy(), dtype=torch.float64)
        base = meta.pop("base_per_pair")
        kept = meta.pop("per_pair_kept")
        known = {f for f in cls.__dataclass_fields__ if f in meta}
        return cls(
            axes=axes,
            cells=[tuple(int(i) for i in row) for row in values[list(axes)].to_numpy()],
            raw=per_pair.mean(1),
            per_pair=per_pair if kept else None,
            base_per_pair=None if base is None else torch.tensor(base, dtype=torch.float64),
            meta={k: v for k, v in meta.items() if k not in known},
            **{k: meta[k] for k in known},
        )


def correlation(exact: PatchResult, approx: PatchResult) -> pd.Series:
    """Pearson and Spearman correlation of two results over their shared cells (e.g. exact vs attribution)."""
    if exact.axes != approx.axes:
        raise ValueError(
            f"The results have different axes ({exact.axes} vs {approx.axes}): compare one component."
        )
    keys = list(exact.axes)

    def frame(result: PatchResult) -> pd.DataFrame:  # cells and values only: no statistics needed here
        return pd.DataFrame(result.cells, columns=keys).assign(value=result.values.tolist())

    merged = frame(exact).merge(frame(approx), on=keys, suffixes=("_a", "_b"))
    return statistics.agreement_of(merged["value_a"], merged["value_b"], "cells")
