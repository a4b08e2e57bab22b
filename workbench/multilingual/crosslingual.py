"""Cross-lingual probing: probes trained on one language's data, tested on every other language's.

Universal Dependencies gives every language the same part-of-speech tags and dependency relations, so a
probe's classes mean the same thing everywhere. :func:`cross_lingual_probes` harvests each language's
:class:`~workbench.data.alignment.TokenLabelledDataset` (CoNLL-U files through ``read_conllu``, or the
multilingual grammar through ``TokenLabelledDataset.from_tagged``) with ``workbench.probing.harvest``,
trains the in-language probes and control probes of every layer with ``workbench.probing.train_probes``,
then applies each language's probes to every other language's test sentences.

Reference points per target language and layer: the target's own (in-language) probe; the control task
(Hewitt & Liang: each word type gets a random label, drawn from the label distribution, and a probe of the
same capacity learns them), both in-language (``control_accuracy``: how much a probe memorises word
types) and transferred the same way as the real probe (``control_transfer_accuracy``: the source's control
probe scored on the target's control labels, the chance level of transfer); and the majority label.
Label sets are unified first (the union of all languages' labels, in first-seen order), so class ``i`` is
the same label in every language; a label the source never saw can't be predicted, which counts as wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.data.alignment import TokenLabelledDataset
from workbench.probing import Harvest, ProbeResult, control_labels, harvest, train_probes

__all__ = ["CrossLingualProbes", "cross_lingual_probes", "unify_labels"]


def unify_labels(datasets: Mapping[str, TokenLabelledDataset]) -> dict[str, TokenLabelledDataset]:
    """The same datasets over one label set: the union of their labels, in first-seen order."""
    names: list[str] = []
    for data in datasets.values():
        names += [n for n in data.label_names if n not in names]
    return {k: TokenLabelledDataset(list(d.sentences), names, d.name) for k, d in datasets.items()}


@dataclass
class CrossLingualProbes:
    """``table``: one row per source x target language x hook: ``accuracy`` of the source's probe on the
    target's test tokens, and the target's ``in_language_accuracy``, ``control_accuracy`` and
    ``majority_baseline`` on the same tokens. ``probes``/``harvests`` per language."""

    table: pd.DataFrame
    probes: dict[str, ProbeResult]
    harvests: dict[str, Harvest]

    def matrix(self, layer: int) -> pd.DataFrame:
        """Transfer accuracy at ``layer``: source (rows) x target (columns); the diagonal is in-language."""
        part = self.table[self.table["layer"] == layer]
        if part.empty:
            raise KeyError(f"No probes at layer {layer}; layers are {sorted(self.table['layer'].unique())}.")
        return part.pivot(index="source", columns="target", values="accuracy")

    def transfer(self) -> pd.DataFrame:
        """Off-diagonal rows only (source != target), with ``above_control`` = accuracy minus the transferred
        control task's accuracy."""
        out = self.table[self.table["source"] != self.table["target"]].copy()
        out["above_control"] = out["accuracy"] - out["control_transfer_accuracy"]
        return out.reset_index(drop=True)

    def figure(self, title: str = "Cross-lingual probe transfer") -> go.Figure:
        """One panel per target language: transfer from each source by layer, with the in-language probe,
        the control task and the majority baseline."""
        targets = list(dict.fromkeys(self.table["target"]))
        fig = make_subplots(rows=1, cols=len(targets), subplot_titles=[f"tested on {t}" for t in targets])
        for col, target in enumerate(targets, start=1):
            part = self.table[self.table["target"] == target]
            for source, rows in part.groupby("source", sort=False):
                own = source == target
                fig.add_trace(
                    go.Scatter(
                        x=rows["layer"],
                        y=rows["accuracy"],
                        mode="lines+markers",
                        name=f"{source} → {target}" if not own else f"{target} (in-language)",
                        line={"width": 3 if own else 1.5},
                    ),
                    row=1,
                    col=col,
                )
            others = part[part["source"] != target]
            ref = part.groupby("layer", sort=True)[["control_accuracy", "majority_baseline"]].first()
            ref["control_transfer_accuracy"] = others.groupby("layer", sort=True)[
                "control_transfer_accuracy"
            ].mean()
            styles = {
                "control_accuracy": "dash",
                "control_transfer_accuracy": "dashdot",
                "majority_baseline": "dot",
            }
            for column, dash in styles.items():
                fig.add_trace(
                    go.Scatter(
                        x=ref.index,
                        y=ref[column],
                        mode="lines",
                        name=f"{target} {column.replace('_', ' ')}",
                        line={"dash": dash, "color": "grey"},
                    ),
                    row=1,
                    col=col,
                )
        fig.update_yaxes(range=[0, 1])
        fig.update_xaxes(title_text="layer (residual stream after l layers)")
        fig.update_layout(title=title, template="plotly_white")
        return fig


def _test_rows(result: ProbeResult, data: dict) -> np.ndarray:
    return np.isin(data["sentence"].numpy(), result.split["test"])


def cross_lingual_probes(
    model,
    datasets: Mapping[str, TokenLabelledDataset],
    folder: str | Path,
    *,
    hooks: list[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = True,
    **probe_kwargs,
) -> CrossLingualProbes:
    """Harvest every language, train its probes, and test every language's probes on every language.

    datasets: ``{language: TokenLabelledDataset}`` labelled by the same column (e.g.
        ``read_conllu(path, "upos")`` per treebank).
    folder: one harvest subfolder per language.
    hooks: as ``harvest``'s (default: the residual stream after 0..n_layers layers).
    probe_kwargs: go to ``train_probes``."""
    if len(datasets) < 2:
        raise ValueError("Cross-lingual probing needs at least two languages' datasets.")
    unified = unify_labels(datasets)
    folder = Path(folder)
    harvests = {
        k: harvest(model, d, folder / k, hooks=hooks, overwrite=overwrite, progress=progress)
        for k, d in unified.items()
    }
    probes = {k: train_probes(h, seed=seed, progress=progress, **probe_kwargs) for k, h in harvests.items()}
    rows = []
    for target, h in harvests.items():
        data = h.load()
        test = _test_rows(probes[target], data)
        labels = data["labels"].long()
        gold = labels.numpy()[test]
        # The target's control labels exactly as train_probes draws them (same function, same seed).
        control = control_labels(data["types"].long(), labels, len(h.label_names), seed).numpy()[test]
        own = probes[target].table.set_index("hook")
        for source, probe in probes.items():
            for hook, layer in zip(probe.hooks, probe.layers):
                predicted = probe.predict(data[hook][test], hook).numpy()
                i, features = probe.index(hook), probe.features(data[hook][test])
                control_logits = features @ probe.control_weight[i, : probe.widths[i]] + probe.control_bias[i]
                rows.append(
                    {
                        "source": source,
                        "target": target,
                        "layer": layer,
                        "hook": hook,
                        "accuracy": float((predicted == gold).mean()),
                        "control_transfer_accuracy": float(
                            (control_logits.argmax(-1).numpy() == control).mean()
                        ),
                        "in_language_accuracy": float(own.loc[hook, "accuracy"]),
                        "control_accuracy": float(own.loc[hook, "control_accuracy"]),
                        "majority_baseline": float(own.loc[hook, "majority_baseline"]),
                        "n_test": int(test.sum()),
                    }
                )
    return CrossLingualProbes(pd.DataFrame(rows), probes, harvests)
