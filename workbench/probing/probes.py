"""Linear probes for every harvested layer, trained at once, with Hewitt-and-Liang control tasks.

All probes are one parameter tensor ``W [hooks, task, width, classes]`` and a bias ``[hooks, task, classes]``,
task 0 the real labels and task 1 the control task, so one ``einsum`` scores every token under every probe and
one AdamW step trains them all. Each probe has its own loss term and parameters, so they train exactly as
separate models would (a test checks it); each keeps the weights of its own best validation loss (early
stopping per probe).

Features are RMS-normalised before the probe, ``x / sqrt(mean(x^2) + eps)`` with the model's ``eps``:
probes of different layers then see features of the same scale, and a probe on the residual stream after
layer ``l`` becomes exactly an ``ApertusForTokenClassification`` truncated to ``l`` layers whose final norm
has unit weight (see :mod:`workbench.probing.export`).

Control task (Hewitt & Liang, 2019): every word type gets a label drawn at random from the empirical label
distribution, the same for all its tokens. A probe that scores well on it memorises word types rather than
reading the property; selectivity = accuracy - control accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score
from tqdm.auto import tqdm

from workbench import figures
from workbench.data.alignment import IGNORE
from workbench.probing.harvest import COLUMNS, Harvest

__all__ = ["ProbeResult", "train_probes", "control_labels", "scores", "confusion_frame"]


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Apertus's RMSNorm without its weight, computed in float32 as the model computes it."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def control_labels(types: torch.Tensor, labels: torch.Tensor, n_classes: int, seed: int = 0) -> torch.Tensor:
    """Hewitt & Liang's control task: each word type -> a label drawn from the empirical label
    distribution."""
    n_types = int(types.max()) + 1 if types.numel() else 0
    frequencies = torch.bincount(labels, minlength=n_classes).double()
    gen = torch.Generator().manual_seed(seed)
    by_type = torch.multinomial(frequencies / frequencies.sum(), n_types, replacement=True, generator=gen)
    return by_type[types]


def scores(gold: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """Accuracy and macro-F1 (over the labels present in gold or predictions), as every probe and evaluation
    in the workbench reports them."""
    gold, predicted = np.asarray(gold), np.asarray(predicted)
    if gold.size == 0:
        return float("nan"), float("nan")
    return float((gold == predicted).mean()), float(
        f1_score(gold, predicted, average="macro", zero_division=0)
    )


def confusion_frame(gold: np.ndarray, predicted: np.ndarray, label_names: Sequence[str]) -> pd.DataFrame:
    """Counts, gold labels as rows and predictions as columns, over the labels that occur in either."""
    gold, predicted = np.asarray(gold), np.asarray(predicted)
    present = sorted(set(gold.tolist()) | set(predicted.tolist()))
    counts = confusion_matrix(gold, predicted, labels=present)
    names = [label_names[i] for i in present]
    return pd.DataFrame(counts, index=pd.Index(names, name="gold"), columns=pd.Index(names, name="predicted"))


@dataclass
class ProbeResult:
    """Trained probes for every hook of a harvest, with their test scores.

    ``table``: one row per hook (layer, hook, accuracy, macro_f1, control_accuracy, selectivity,
    majority_baseline, n_test). ``weight [hooks, width, classes]`` and ``bias [hooks, classes]`` are the
    real-label probes, applied to RMS-normalised features (``normalize``) with ``eps``.
    """

    hooks: list[str]
    layers: list[int]
    label_names: list[str]
    weight: torch.Tensor
    bias: torch.Tensor
    control_weight: torch.Tensor
    control_bias: torch.Tensor
    widths: list[int]
    normalize: bool
    eps: float
    table: pd.DataFrame
    test_gold: np.ndarray
    test_predictions: np.ndarray  # [hooks, n_test]
    split: dict[str, np.ndarray]  # sentence indices of train / val / test
    history: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def model_identity(self) -> str | None:
        """The identity of the model whose activations trained the probes (see :mod:`workbench.identity`):
        ``export_probe`` refuses any other model."""
        return (self.settings.get("model") or {}).get("weights")

    def index(self, layer: int | str) -> int:
        """The probe of ``layer`` (an entry of ``layers``) or of a hook name."""
        if isinstance(layer, str):
            if layer not in self.hooks:
                raise KeyError(f"No probe for hook {layer!r}; probes exist for {self.hooks}.")
            return self.hooks.index(layer)
        matches = [i for i, value in enumerate(self.layers) if value == layer]
        if len(matches) != 1:
            raise KeyError(
                f"Layer {layer!r} "
                + ("is ambiguous (several hooks)" if matches else "has no probe")
                + f": layers {self.layers}; pass the hook name instead (one of {self.hooks})."
            )
        return matches[0]

    def features(self, activations: torch.Tensor) -> torch.Tensor:
        """The probe's input from raw hook activations ``[..., width]``: RMS-normalised when ``normalize``."""
        return rms_normalize(activations, self.eps) if self.normalize else activations.float()

    def logits(self, activations: torch.Tensor, layer: int | str) -> torch.Tensor:
        """Class scores ``[..., classes]`` of the probe at ``layer`` for raw activations of its hook."""
        i = self.index(layer)
        x = self.features(activations)
        return x @ self.weight[i, : self.widths[i]] + self.bias[i]

    def predict(self, activations: torch.Tensor, layer: int | str) -> torch.Tensor:
        """Class ids ``[...]`` predicted by the probe at ``layer``."""
        return self.logits(activations, layer).argmax(-1)

    def run(self, model: Any, input_ids: torch.Tensor, layer: int | str, attention_mask=None) -> torch.Tensor:
        """Probabilities ``[batch, pos, classes]`` of the probe at ``layer`` on new token ids (one
        forward)."""
        hook = self.hooks[self.index(layer)]
        _, cache = model.run_with_cache(input_ids, names_filter=hook, attention_mask=attention_mask)
        act = cache[hook]
        act = act.reshape(*act.shape[:2], -1)
        return self.logits(act.cpu(), layer).softmax(-1)

    def confusion(self, layer: int | str) -> pd.DataFrame:
        """Test-set confusion matrix of the probe at ``layer``: gold rows, predicted columns."""
        return confusion_frame(self.test_gold, self.test_predictions[self.index(layer)], self.label_names)

    def confusion_figure(self, layer: int | str) -> go.Figure:
        frame = self.confusion(layer)
        share = frame.div(frame.sum(axis=1).clip(lower=1), axis=0)
        return figures.heatmap(
            share.values,
            x=[figures.escape_label(c) for c in frame.columns],
            y=[figures.escape_label(c) for c in frame.index],
            zmin=0,
            zmax=1,
            text=frame.values,
            hover="gold %{y}, predicted %{x}: %{text}<extra></extra>",
            title=f"Confusion at {self.hooks[self.index(layer)]} (test set; colour = share of the gold row)",
            x_title="predicted",
            y_title="gold",
        )

    def figure(self, title: str | None = None) -> go.Figure:
        """Test accuracy by layer, with the control task, selectivity and the majority baseline."""
        t = self.table
        x = t["layer"] if t["layer"].is_unique else t["hook"]
        fig = figures.figure()
        fig.add_scatter(x=x, y=t["accuracy"], mode="lines+markers", name="probe accuracy")
        fig.add_scatter(
            x=x,
            y=t["control_accuracy"],
            mode="lines+markers",
            name="control task accuracy",
            line={"dash": "dot"},
        )
        fig.add_scatter(
            x=x, y=t["selectivity"], mode="lines+markers", name="selectivity", line={"dash": "dash"}
        )
        fig.add_scatter(
            x=x,
            y=t["majority_baseline"],
            mode="lines",
            name="majority baseline",
            line={"color": figures.NEUTRAL, "dash": "longdash"},
        )
        fig.update_layout(
            title=title or "Linear probe accuracy by layer (test split)",
            xaxis_title="layer (residual stream after this many layers)" if t["layer"].is_unique else "hook",
            yaxis_title="accuracy",
            yaxis_range=[0, 1.02],
            height=380,
        )
        return fig

    def export(self, layer: int | str, folder, model: Any, **kwargs) -> Any:
        """Write the probe at ``layer`` as an ApertusForTokenClassification checkpoint (see
        probing.export)."""
        from workbench.probing.export import export_probe

        return export_probe(self, layer, folder, model, **kwargs)


def _split_sentences(sentences: np.ndarray, fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"split must be three positive fractions (train, val, test) summing to 1, not {fractions}."
        )
    unique = np.unique(sentences)
    if len(unique) < 3:
        raise ValueError(
            f"Only {len(unique)} labelled sentences: a train/validation/test split needs at least 3."
        )
    order = np.random.default_rng(seed).permutation(unique)
    n_train = max(1, int(round(fractions[0] * len(order))))
    n_val = max(1, int(round(fractions[1] * len(order))))
    n_train = min(n_train, len(order) - 2)
    return {
        "train": np.sort(order[:n_train]),
        "val": np.sort(order[n_train : n_train + n_val]),
        "test": np.sort(order[n_train + n_val :]),
    }


def train_probes(
    harvest: Harvest | str,
    *,
    hooks: list[str] | None = None,
    split: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    normalize: bool = True,
    lr: float = 0.05,
    weight_decay: float = 0.1,
    max_steps: int = 500,
    batch_size: int | None = None,
    eval_every: int = 10,
    patience: int = 5,
    min_improvement: float = 1e-3,
    shuffle_labels: bool = False,
    progress: bool = True,
) -> ProbeResult:
    """Train a linear probe and a control-task probe for every hook of ``harvest``, all in one computation.

    split: train / validation / test fractions of the sentences (tokens of one sentence stay together).
    lr, weight_decay: AdamW's (decay on the weights, not the biases); batch_size: tokens per step (None: the
        full training set every step); every ``eval_every`` steps each probe's validation loss is checked and
        its best weights kept; training stops when no probe has improved (by a relative ``min_improvement``)
        for ``patience`` checks.
    shuffle_labels: a sanity check, permute the labels across tokens; probes should then fall to chance.
    Training holds the harvested features in memory once, as float32 (tokens x hooks x width x 4 bytes, e.g.
    100k tokens x 33 layers x 4096 = 54 GB for an 8B model: harvest fewer hooks, or train on a subset of them
    with ``hooks``); shards are read one hook at a time straight into the train/validation/test buffers and
    normalised there in place, and each step runs one hook at a time, so what training needs beyond the
    features is one shard's piece of one hook, or one hook's logits (or mini-batch), at a time.
    """
    _check_training(lr, weight_decay, max_steps, batch_size, eval_every, patience)
    if not isinstance(harvest, Harvest):
        harvest = Harvest.open(harvest)
    hooks = harvest.check_hooks(harvest.hooks if hooks is None else list(hooks))
    if not hooks:
        raise ValueError(f"hooks=[] trains nothing: pass None (all of {harvest.hooks}) or some of them.")
    harvest.verify()
    columns = {key: torch.cat(list(harvest.shard_tensors(key, verify=False))) for key in COLUMNS}
    n_classes = len(harvest.label_names)
    labels = columns["labels"].long()
    present = labels.unique().tolist()
    if len(present) < 2:
        names = [harvest.label_names[k] for k in present]
        raise ValueError(
            f"Every one of the {len(labels)} labelled tokens has the label {names}: a probe needs at least "
            "two classes to tell apart. Harvest data with more than one label."
        )
    if shuffle_labels:
        labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + 1))]
    control = control_labels(columns["types"].long(), labels, n_classes, seed)
    eps = float(harvest.manifest["model"]["eps"])

    parts = _split_sentences(columns["sentence"].numpy(), split, seed)
    masks = {name: np.isin(columns["sentence"].numpy(), ids) for name, ids in parts.items()}
    for name, mask in masks.items():
        if not mask.any():
            raise ValueError(f"The {name} split has no labelled token; use more sentences.")
    # Rows laid out train, then validation, then test, each split in its own buffer (never a copy of one).
    order = torch.from_numpy(np.concatenate([np.flatnonzero(masks[n]) for n in ("train", "val", "test")]))
    n_train, n_val = int(masks["train"].sum()), int(masks["val"].sum())
    bounds = [0, n_train, n_train + n_val, len(order)]
    (x_train, x_val, x_test), widths = _feature_buffer(harvest, hooks, order, eps, normalize, bounds)
    targets = torch.stack([labels, control], dim=1)[order]  # [n, task]
    train, val, test = slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None)

    weight, bias, history = _fit(
        x_train,
        targets[train],
        x_val,
        targets[val],
        n_classes,
        lr=lr,
        weight_decay=weight_decay,
        max_steps=max_steps,
        batch_size=batch_size,
        eval_every=eval_every,
        patience=patience,
        min_improvement=min_improvement,
        seed=seed,
        progress=progress,
    )

    t_test = targets[test]
    with torch.no_grad():
        predicted = torch.stack(
            [_logits(x_test[i], weight[i], bias[i]).argmax(-1) for i in range(len(hooks))]
        )
    majority_label = int(torch.bincount(targets[train, 0], minlength=n_classes).argmax())
    gold = t_test[:, 0].numpy()
    table = []
    for i, h in enumerate(hooks):
        accuracy, macro_f1 = scores(gold, predicted[i, :, 0].numpy())
        control_accuracy, _ = scores(t_test[:, 1].numpy(), predicted[i, :, 1].numpy())
        table.append(
            {
                "layer": harvest.layers[harvest.hooks.index(h)],
                "hook": h,
                "accuracy": accuracy,
                "macro_f1": macro_f1,
                "control_accuracy": control_accuracy,
                "selectivity": accuracy - control_accuracy,
                "majority_baseline": float((gold == majority_label).mean()),
                "n_test": len(gold),
            }
        )
    return ProbeResult(
        hooks=hooks,
        layers=[row["layer"] for row in table],
        label_names=harvest.label_names,
        weight=weight[:, 0].clone(),
        bias=bias[:, 0].clone(),
        control_weight=weight[:, 1].clone(),
        control_bias=bias[:, 1].clone(),
        widths=widths,
        normalize=normalize,
        eps=eps,
        table=pd.DataFrame(table),
        test_gold=gold,
        test_predictions=predicted[:, :, 0].numpy(),
        split=parts,
        history=history,
        settings={
            "lr": lr,
            "weight_decay": weight_decay,
            "max_steps": max_steps,
            "batch_size": batch_size,
            "seed": seed,
            "shuffle_labels": shuffle_labels,
            "split": list(split),
            "model": harvest.manifest["model"],
            "data": harvest.manifest["data"],
        },
    )


def _check_training(lr, weight_decay, max_steps, batch_size, eval_every, patience) -> None:
    for what, value in (("max_steps", max_steps), ("eval_every", eval_every), ("patience", patience)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{what} must be a whole number, at least 1 (got {value!r}).")
    if batch_size is not None and (
        not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
    ):
        raise ValueError(
            f"batch_size must be None (the whole training set each step) or a whole number of tokens, at "
            f"least 1 (got {batch_size!r})."
        )
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive number (got {lr!r}); the default is 0.05.")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0 (got {weight_decay!r}).")


def _feature_buffer(
    harvest: Harvest, hooks: list[str], order: torch.Tensor, eps: float, normalize: bool, bounds: list[int]
) -> tuple[list[torch.Tensor], list[int]]:
    """The probes' inputs as float32 buffers ``[hooks, n_split, width]``, one per split (rows ``order[lo:hi]``
    for each ``(lo, hi)`` of ``bounds``): together the only full-size allocation of training, and each
    contiguous, so no matmul copies it. They are filled one shard of one hook at a time, in row chunks, and
    normalised in place, so the only other memory is one shard's piece of one hook and a chunk."""
    destination = torch.empty_like(order)
    destination[order] = torch.arange(len(order))
    widths = [math.prod(harvest.row_shape(h)) for h in hooks]
    spans = list(zip(bounds[:-1], bounds[1:]))
    buffers = [torch.empty(len(hooks), hi - lo, max(widths)) for lo, hi in spans]
    for i, h in enumerate(hooks):
        width, chunk = widths[i], _chunk_rows(widths[i])
        for x in buffers:
            # Narrower hooks are zero-padded: zero features get zero gradient, so the probe is exactly a
            # narrower one.
            x[i, :, width:] = 0
        row = 0
        for piece in harvest.shard_tensors(h, verify=False):
            piece = piece.reshape(len(piece), -1)
            where = destination[row : row + len(piece)]
            for x, (lo, hi) in zip(buffers, spans):
                rows = torch.nonzero((where >= lo) & (where < hi)).squeeze(1)
                if len(rows) == 0:
                    continue
                # Each split's rows keep their harvest order, so a piece's rows of one split are consecutive
                # in that split's buffer.
                first = int(where[rows[0]]) - lo
                for start in range(0, len(rows), chunk):
                    part = rows[start : start + chunk]
                    x[i, first + start : first + start + len(part), :width] = piece.index_select(0, part)
            row += len(piece)
            del piece
        if normalize:
            for x in buffers:
                for start in range(0, x.shape[1], chunk):
                    block = x[i, start : start + chunk, :width]
                    # rms_normalize, in place: the same float32 arithmetic, without a second copy.
                    block.mul_(torch.rsqrt(block.pow(2).mean(-1, keepdim=True) + eps))
    return buffers, widths


def _chunk_rows(width: int, budget: int = 16 * 2**20) -> int:
    """Rows of ``width`` float32 features in about ``budget`` bytes: the size of every temporary that
    filling the buffers makes."""
    return max(1, budget // (4 * max(width, 1)))


def _logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # One hook: x [n, width] (a view of the features: no copy), weight [task, width, classes], bias
    # [task, classes] -> [n, task, classes]
    n, width = x.shape
    tasks, _, classes = weight.shape
    w = weight.permute(1, 0, 2).reshape(width, tasks * classes)
    return (x @ w).view(n, tasks, classes) + bias


def _losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of one hook's probes: [task]."""
    n, tasks, classes = logits.shape
    loss = F.cross_entropy(
        logits.reshape(-1, classes), targets.reshape(-1), reduction="none", ignore_index=IGNORE
    )
    return loss.view(n, tasks).mean(0)


def _fit(
    x_train,
    t_train,
    x_val,
    t_val,
    n_classes,
    *,
    lr,
    weight_decay,
    max_steps,
    batch_size,
    eval_every,
    patience,
    min_improvement,
    seed,
    progress,
):
    hooks, _, width = x_train.shape
    gen = torch.Generator().manual_seed(seed)
    weight = torch.zeros(hooks, 2, width, n_classes, requires_grad=True)
    bias = torch.zeros(hooks, 2, n_classes, requires_grad=True)
    optimizer = torch.optim.AdamW(
        [{"params": [weight], "weight_decay": weight_decay}, {"params": [bias], "weight_decay": 0.0}], lr=lr
    )
    best_loss = torch.full((hooks, 2), float("inf"))
    best_weight, best_bias = weight.detach().clone(), bias.detach().clone()
    since_best = torch.zeros(hooks, 2, dtype=torch.long)
    history = []
    n = x_train.shape[1]
    bar = tqdm(total=max_steps, desc="probes", unit="step", disable=not progress)
    with torch.enable_grad():
        for step in range(1, max_steps + 1):
            rows = None
            if batch_size is not None and batch_size < n:
                rows = torch.randint(0, n, (batch_size,), generator=gen)
            tb = t_train if rows is None else t_train[rows]
            optimizer.zero_grad(set_to_none=True)
            losses = []
            # Independent probes: each hook's loss reaches only its own slice of the gradient, so one
            # backward per hook gives the gradient of the sum while holding one hook's logits and mini-batch
            # (not every hook's) at a time.
            for i in range(hooks):
                xb = x_train[i] if rows is None else x_train[i].index_select(0, rows)
                hook_losses = _losses(_logits(xb, weight[i], bias[i]), tb)
                hook_losses.sum().backward()
                losses.append(hook_losses.detach())
            loss = torch.stack(losses).sum()
            optimizer.step()
            bar.update(1)
            if step % eval_every and step != max_steps:
                continue
            with torch.no_grad():
                val = torch.stack(
                    [_losses(_logits(x_val[i], weight[i], bias[i]), t_val) for i in range(hooks)]
                )
                better = val < best_loss * (1 - min_improvement)
                best_loss = torch.where(better, val, best_loss)
                best_weight[better] = weight.detach()[better]
                best_bias[better] = bias.detach()[better]
                since_best = torch.where(better, 0, since_best + 1)
            history.append(
                {"step": step, "train_loss": loss.item() / (2 * hooks), "val_loss": val.mean().item()}
            )
            bar.set_postfix(val_loss=f"{float(val.mean()):.3f}")
            if bool((since_best >= patience).all()):
                break
    bar.close()
    return best_weight, best_bias, pd.DataFrame(history)
