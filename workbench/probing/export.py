"""A probe as a Hugging Face `ApertusForTokenClassification`, and the evaluation of any such checkpoint.

`ApertusForTokenClassification` computes ``score(dropout(norm(h_L)))``: the decoder layers, the final RMSNorm
on the last layer's output, then a linear head with a bias. A probe at layer ``l`` reads ``h_l``, the residual
stream after ``l`` layers (before any final norm), RMS-normalised without a weight (see
:mod:`workbench.probing.probes`). So the export keeps the embeddings and the first ``l`` layers, sets the
final norm's weight to ones (same ``eps``), and puts the probe's weight and bias in ``score``: the checkpoint
computes the probe's own function, and its predictions are the probe's, token for token (up to float rounding
in the last place of the logits, in float32). Dropout is off in eval mode and set to 0 in the config.

:func:`evaluate` scores any `ApertusForTokenClassification` (an exported probe or one fine-tuned elsewhere) on
a token-labelled dataset with the same alignment and metrics as the probes.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import ApertusForTokenClassification

from workbench.data.alignment import IGNORE, EncodedDataset, TokenLabelledDataset
from workbench.probing.harvest import _model_identity, is_residual_hook
from workbench.probing.probes import ProbeResult, confusion_frame, scores

__all__ = ["Evaluation", "evaluate", "export_probe"]


def export_probe(
    result: ProbeResult, layer: int | str, folder: str | Path, model: Any, *, overwrite: bool = False
) -> Path:
    """Write the probe at ``layer`` of ``result`` as an `ApertusForTokenClassification` checkpoint in
    ``folder``.

    ``model`` is the `HookedApertus` the probe's features were harvested from (its identity is checked). The
    folder gets config.json (``num_hidden_layers = l``, ``id2label``/``label2id``), model.safetensors, the
    tokenizer and probe.json (where the probe came from and its test scores). It is written under a temporary
    name and renamed, so a failure never leaves a half-written checkpoint.
    """
    i = result.index(layer)
    hook, n_layers = result.hooks[i], result.layers[i]
    if not is_residual_hook(hook):
        raise ValueError(
            f"The probe at {hook} reads a non-residual activation, "
            "which no ApertusForTokenClassification computes; "
            "export probes of the residual stream (hook_embed, hook_resid_pre, hook_resid_post)."
        )
    if not result.normalize:
        raise ValueError(
            "This probe was trained on raw activations (normalize=False), "
            "but ApertusForTokenClassification applies "
            "its final RMSNorm before the head: retrain with normalize=True to export it exactly."
        )
    harvested = result.settings.get("model")
    if harvested is not None and harvested != _model_identity(model):
        raise ValueError(
            f"The probes were trained on activations of another model ({harvested['name']}, weights "
            f"{harvested['weights']}) than the one given ({model.cfg.model_name}); pass the harvest's model."
        )
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True or another folder.")

    source = model.hf_model
    config = copy.deepcopy(source.config)
    config.num_hidden_layers = n_layers
    config.architectures = ["ApertusForTokenClassification"]
    config.id2label = dict(enumerate(result.label_names))
    config.label2id = {name: k for k, name in enumerate(result.label_names)}
    config.num_labels = len(result.label_names)
    config.classifier_dropout = 0.0
    config.token_classification_bias = True
    classifier = ApertusForTokenClassification(config).eval()

    state = {}
    for key, value in source.model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "layers" and int(parts[1]) >= n_layers:
            continue
        state[f"model.{key}"] = value
    state["model.norm.weight"] = torch.ones_like(source.model.norm.weight)
    dtype = source.model.norm.weight.dtype
    state["score.weight"] = result.weight[i, : result.widths[i]].T.contiguous().to(dtype)
    state["score.bias"] = result.bias[i].to(dtype)
    classifier.load_state_dict(state, strict=True)
    classifier.to(dtype)

    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        classifier.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        row = result.table.iloc[i].to_dict()
        provenance = {
            "source_model": model.cfg.model_name,
            "hook": hook,
            "layers_kept": n_layers,
            "features": "residual stream RMS-normalised (final norm weight = 1), eps from the source config",
            "labels": result.label_names,
            "test_scores": {
                k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in row.items()
            },
            "settings": {k: v for k, v in result.settings.items() if k != "model"},
        }
        (tmp / "probe.json").write_text(json.dumps(provenance, indent=1, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


@dataclass
class Evaluation:
    """Scores of a token classifier on a dataset: ``predictions`` has one row per labelled token."""

    accuracy: float
    macro_f1: float
    n_tokens: int
    label_names: list[str]
    unknown_labels: list[str]
    predictions: pd.DataFrame

    def confusion(self) -> pd.DataFrame:
        """Gold labels as rows, predictions as columns (counts)."""
        index = {name: k for k, name in enumerate(self.label_names)}
        gold = self.predictions["gold"].map(index).to_numpy()
        predicted = self.predictions["predicted"].map(index).to_numpy()
        return confusion_frame(gold, predicted, self.label_names)

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame(
            [{"accuracy": self.accuracy, "macro_f1": self.macro_f1, "n_tokens": self.n_tokens}]
        )


def evaluate(
    checkpoint_or_model: str | Path | Any,
    dataset: TokenLabelledDataset | EncodedDataset,
    *,
    subtokens: str = "first",
    tokenizer: Any = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Evaluation:
    """Run an `ApertusForTokenClassification` over ``dataset``: a checkpoint folder, a model loaded with
    ``workbench.load``, or a transformers ``ApertusForTokenClassification`` (give ``tokenizer`` with it).

    Labels are matched by name with the checkpoint's ``id2label``; a gold label the checkpoint does not know
    is scored as an error and listed in ``unknown_labels``. A :class:`TokenLabelledDataset` is aligned with
    the checkpoint's tokenizer (``subtokens`` as in ``encode``).
    """
    from workbench.hooked_model import HookedApertus
    from workbench.loading import load

    model = checkpoint_or_model
    if isinstance(model, (str, Path)):
        model = load(model)
    elif isinstance(model, ApertusForTokenClassification):
        model = HookedApertus(model.eval(), tokenizer)
    if model.cfg.original_architecture != "ApertusForTokenClassification":
        raise TypeError(
            f"{model.cfg.model_name} is an {model.cfg.original_architecture}, not a token classifier: "
            "export a probe with probing.export_probe(...) or pass an ApertusForTokenClassification "
            "checkpoint."
        )
    if isinstance(dataset, TokenLabelledDataset):
        tokenizer = tokenizer or model.tokenizer
        if tokenizer is None:
            raise ValueError("This model came without a tokenizer: pass tokenizer=... or an EncodedDataset.")
        data = dataset.encode(tokenizer, subtokens=subtokens)
    else:
        data = dataset
    id2label = {int(k): v for k, v in model.hf_model.config.id2label.items()}
    model_names = [id2label[k] for k in range(len(id2label))]
    unknown = [name for name in data.label_names if name not in model_names]

    rows = []
    bar = tqdm(total=len(data), desc="evaluate", unit="sent", disable=not progress)
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            indices = list(range(start, min(start + batch_size, len(data))))
            batch = data.batch(indices)
            probs = (
                model(batch["input_ids"], attention_mask=batch["attention_mask"]).float().softmax(-1).cpu()
            )
            mask = batch["labels"] != IGNORE
            confidence, predicted = probs[mask].max(-1)
            r, c = mask.nonzero(as_tuple=True)
            for k in range(len(r)):
                rows.append(
                    (
                        indices[int(r[k])],
                        int(c[k]),
                        data.label_names[int(batch["labels"][r[k], c[k]])],
                        model_names[int(predicted[k])],
                        float(confidence[k]),
                    )
                )
            bar.update(len(indices))
    bar.close()
    predictions = pd.DataFrame(rows, columns=["sentence", "position", "gold", "predicted", "confidence"])
    names = model_names + [name for name in unknown if name not in model_names]
    index = {name: k for k, name in enumerate(names)}
    accuracy, macro_f1 = scores(
        predictions["gold"].map(index).to_numpy(), predictions["predicted"].map(index).to_numpy()
    )
    return Evaluation(accuracy, macro_f1, len(predictions), names, unknown, predictions)
