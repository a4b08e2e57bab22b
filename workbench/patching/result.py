"""A sweep's result, cell by cell: a table, a grid and a plotly heatmap; the correlation of two results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
import torch

from workbench import figures
from workbench.patching.components import Cell

if TYPE_CHECKING:
    from workbench.patching.experiment import PatchingExperiment


@dataclass
class PatchResult:
    """One sweep's values, cell by cell: `.table`, `.grid()`, `.figure()`.

    `raw` is the metric of each patched run; `values` is `raw` normalised (0 = corrupted run, 1 = clean
    run) when `normalized` is set, else `raw`.
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
    experiment: PatchingExperiment | None = field(default=None, repr=False)

    @property
    def values(self) -> torch.Tensor:
        if not self.normalized:
            return self.raw
        return (self.raw - self.corrupted_value) / (self.clean_value - self.corrupted_value)

    @property
    def table(self) -> pd.DataFrame:
        """One row per cell: its index columns (with the token at `pos`), `value` and `raw`."""
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
        return frame

    def top(self, k: int = 10) -> pd.DataFrame:
        """The k cells of largest |value|."""
        table = self.table
        return table.loc[table["value"].abs().sort_values(ascending=False).index[:k]].reset_index(drop=True)

    def grid(self) -> torch.Tensor:
        """Values on the full grid, shaped by `axes` (NaN where a cell was not swept)."""
        shape = [self.sizes[a] for a in self.axes]
        out = torch.full(shape, float("nan"), dtype=torch.float64)
        for cell, value in zip(self.cells, self.values.tolist()):
            out[cell] = value
        return out

    def heatmap_axes(self) -> tuple[torch.Tensor, list[str], list[str], list[list[Cell]]]:
        """(z [rows, cols], row labels, column labels, the cell behind each entry) for a 2-D view."""
        grid, a = self.grid(), self.axes
        layers = sorted({c[0] for c in self.cells})
        grid = grid[layers]
        if a == ("layer", "head", "pos"):
            rows = [f"L{layer}H{h}" for layer in layers for h in range(self.sizes["head"])]
            cells = [
                [(layer, h, p) for p in range(self.sizes["pos"])]
                for layer in layers
                for h in range(self.sizes["head"])
            ]
            return grid.flatten(0, 1), rows, self._labels("pos"), cells
        cells = [[(layer, j) for j in range(self.sizes[a[1]])] for layer in layers]
        return grid, [f"L{layer}" for layer in layers], self._labels(a[1]), cells

    def _labels(self, axis: str) -> list[str]:
        n = self.sizes[axis]
        if axis == "pos":
            # Position first: plotly merges equal category labels, and a prompt repeats tokens.
            return [f"{p}:{self.str_tokens[p]}" for p in range(n)]
        prefix = {"head": "H", "kv_head": "KV", "neuron": "N"}[axis]
        return [f"{prefix}{i}" for i in range(n)]

    def figure(self, title: str | None = None) -> go.Figure:
        """A plotly heatmap (rows = layers, or layer-heads; columns = tokens, heads or neurons)."""
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
        return fig


def correlation(exact: PatchResult, approx: PatchResult) -> pd.Series:
    """Pearson and Spearman correlation of two results over their shared cells (e.g. exact vs attribution)."""
    if exact.axes != approx.axes:
        raise ValueError(
            f"The results have different axes ({exact.axes} vs {approx.axes}): compare one component."
        )
    keys = list(exact.axes)
    merged = exact.table[[*keys, "value"]].merge(
        approx.table[[*keys, "value"]], on=keys, suffixes=("_a", "_b")
    )
    if len(merged) < 2:
        raise ValueError("Fewer than two shared cells: nothing to correlate.")
    a, b = merged["value_a"], merged["value_b"]
    return pd.Series(
        {
            "pearson": a.corr(b),
            "spearman": a.rank().corr(b.rank()),  # Spearman = Pearson on ranks (no scipy needed)
            "cells": len(merged),
            "max_abs_diff": (a - b).abs().max(),
        }
    )
