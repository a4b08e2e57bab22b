"""Edge and path results: one row per edge (or sender), per-pair values, statistics, files."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from workbench import statistics
from workbench.saved import load_result, save_result


@dataclass
class EdgeResult:
    """Values per edge (or per path), with the same conventions as `patching.PatchResult`.

    rows: one row per edge: sender, receiver, input ("q", "k", "v", "mlp", "logits"), layers, query_heads.
    per_pair [rows, pairs]: the metric of each patched run per pair (for attribution: the estimate);
    base_per_pair [pairs]: the unpatched base run's. `values` are normalised (0 = corrupted, 1 = clean)
    when `normalized`, else raw; `.table` adds the effect statistics (change from the base run).
    """

    rows: pd.DataFrame
    per_pair: torch.Tensor
    base_per_pair: torch.Tensor
    metric: str
    direction: str
    method: str  # "edge patching", "path patching", "eap", "eap-ig"
    normalized: bool
    clean_value: float
    corrupted_value: float
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def raw(self) -> torch.Tensor:
        return self.per_pair.mean(1)

    @property
    def values(self) -> torch.Tensor:
        if not self.normalized:
            return self.raw
        return (self.raw - self.corrupted_value) / (self.clean_value - self.corrupted_value)

    @property
    def scores(self) -> torch.Tensor:
        """The mean effect of each row: its value minus the base run's (what circuits rank edges by)."""
        return self.effects().mean(1)

    def effects(self) -> torch.Tensor:
        effect = self.per_pair - self.base_per_pair[None]
        return effect / (self.clean_value - self.corrupted_value) if self.normalized else effect

    @property
    def table(self) -> pd.DataFrame:
        frame = self.rows.copy()
        frame["value"] = self.values.tolist()
        frame["raw"] = self.raw.tolist()
        effects = self.effects()
        frame = pd.concat([frame, statistics.summary(effects)], axis=1)
        frame.attrs["statistics"] = statistics.method_note(effects.shape[1])
        return frame

    def top(self, k: int = 10) -> pd.DataFrame:
        """The k rows of largest |effect|."""
        table = self.table
        return table.loc[table["mean"].abs().sort_values(ascending=False).index[:k]].reset_index(drop=True)

    def subset(self, index) -> EdgeResult:
        index = list(index)
        return replace(self, rows=self.rows.iloc[index].reset_index(drop=True), per_pair=self.per_pair[index])

    def save(self, path: str | Path) -> Path:
        """Write `path` (.json: rows and per-pair values) and its `.meta.json`; no pickle, no model."""
        values = self.rows.copy()
        for j in range(self.per_pair.shape[1]):
            values[f"pair_{j}"] = self.per_pair[:, j].tolist()
        meta = {
            "metric": self.metric,
            "direction": self.direction,
            "method": self.method,
            "normalized": self.normalized,
            "clean_value": self.clean_value,
            "corrupted_value": self.corrupted_value,
            "base_per_pair": self.base_per_pair.tolist(),
            "component": "edges",
            **self.meta,
        }
        return save_result(path, "edge_result", meta, values)

    @classmethod
    def load(cls, path: str | Path) -> EdgeResult:
        kind, meta, values = load_result(path)
        if kind != "edge_result":
            raise ValueError(f"{path} holds a {kind!r}, not an edge result.")
        pair_columns = [c for c in values.columns if c.startswith("pair_")]
        rows = values.drop(columns=pair_columns)
        if "query_heads" in rows:
            rows["query_heads"] = rows["query_heads"].fillna("").astype(str)
        known = {k: meta.pop(k) for k in ("metric", "direction", "method", "normalized")}
        known |= {k: meta.pop(k) for k in ("clean_value", "corrupted_value")}
        base = torch.tensor(meta.pop("base_per_pair"), dtype=torch.float64)
        meta.pop("component", None)
        per_pair = torch.tensor(values[pair_columns].to_numpy(), dtype=torch.float64)
        return cls(rows=rows, per_pair=per_pair, base_per_pair=base, meta=meta, **known)


def agreement(exact: EdgeResult, approx: EdgeResult) -> pd.Series:
    """Pearson and Spearman correlation of two edge results' scores over their shared edges."""
    keys = ["sender", "receiver"]
    a = exact.rows[keys].assign(score=exact.scores.tolist())
    b = approx.rows[keys].assign(score=approx.scores.tolist())
    merged = a.merge(b, on=keys, suffixes=("_exact", "_approx"))
    return statistics.agreement_of(merged["score_exact"], merged["score_approx"], "edges")
