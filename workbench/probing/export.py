"""A probe as a Hugging Face `ApertusForTokenClassification`, and the evaluation of any such checkpoint.

`ApertusForTokenClassification` computes ``score(dropout(norm(h_L)))``: the decoder layers, the final RMSNorm
on the last layer's output, then a linear head with a bias. A probe at layer ``l`` reads ``h_l``, the residual
stream after ``l`` layers (before any final norm), RMS-normalised without a weight (see
:mod:`workbench.probing.probes`). So the tagger keeps the embeddings and the first ``l`` layers of the model,
sets the final norm's weight to ones (same ``eps``), and puts the probe's weight and bias in ``score``: it
computes the probe's own function, and its predictions are the probe's, token for token (up to float rounding
in the last place of the logits, in float32). In bfloat16 the tagger's norm output, head and logits are
rounded to bf16: its logits are within ``0.02 * (1 + max |probe logit|)`` of the probe's on each token
(measured: at most 0.011 on the shipped model), so the predictions agree wherever the probe's top two logits
are further apart than twice that (a test checks both). Dropout is off in eval mode and set to 0 in the
config.

By default the export does not copy the model: ``probe.safetensors`` holds the head and the unit norm (a few
kB), ``config.json`` is the tagger's config naming the base checkpoint and layer, and
:func:`load_probe_tagger` builds the tagger from the base checkpoint (``from_pretrained`` with
``num_hidden_layers`` cut) with the head on top, after checking that the base still holds the weights the
probe was trained on. ``standalone=True`` writes a self-contained checkpoint instead (the kept layers copied
to disk, straight from the model's tensors: no second copy in memory).

Writing is atomic: the checkpoint is written beside the target under a temporary name and swapped in with
renames, so a failure leaves the previous checkpoint whole; overwriting deletes only files a previous export
wrote (listed in its probe.json) and refuses a folder holding anything else.

:func:`evaluate` scores any `ApertusForTokenClassification` (an exported probe or one fine-tuned elsewhere) on
a token-labelled dataset with the same alignment and metrics as the probes.
"""

from __future__ import annotations

import copy
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import ApertusForTokenClassification, AutoConfig
from transformers.utils import logging as hf_logging

from workbench.data.alignment import IGNORE, EncodedDataset, TokenLabelledDataset
from workbench.identity import model_identity, tensors_digest
from workbench.inputs import batches
from workbench.probing.harvest import is_residual_hook
from workbench.probing.probes import ProbeResult, confusion_frame, scores

__all__ = ["Evaluation", "evaluate", "export_probe", "load_probe_tagger", "is_probe_folder"]

PROBE_FILE = "probe.safetensors"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def export_probe(
    result: ProbeResult,
    layer: int | str,
    folder: str | Path,
    model: Any,
    *,
    standalone: bool = False,
    base: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the probe at ``layer`` of ``result`` as an `ApertusForTokenClassification` in ``folder``.

    ``model`` is the `HookedApertus` the probe's features were harvested from: another model (any weight
    different, see :mod:`workbench.identity`) is refused. By default the folder gets config.json (the
    tagger's config: ``num_hidden_layers = l``, ``id2label``/``label2id``, ``probe_base_checkpoint``),
    probe.safetensors (head and unit norm) and probe.json (where the probe came from, its test scores, the
    files written); load it with ``load_probe_tagger(folder)``.
    base: the checkpoint the tagger is built on (default: the folder or hub id ``model`` was loaded from).
    standalone: True writes a full checkpoint (model.safetensors with the kept layers, the tokenizer) that
        ``ApertusForTokenClassification.from_pretrained(folder)`` loads alone.
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
    trained_on = result.model_identity
    if trained_on is not None and trained_on != model_identity(model):
        raise ValueError(
            f"The probes were trained on activations of another model (weights {trained_on[:12]}...) than "
            f"the one given ({model.cfg.model_name}, weights {model_identity(model)[:12]}...): pass the "
            "model the harvest was made with."
        )
    folder = Path(folder)
    _check_target(folder, overwrite)
    base = None if standalone else _base_checkpoint(model, base)

    source = model.hf_model
    dtype = source.model.norm.weight.dtype
    config = _tagger_config(source.config, result, n_layers, dtype)
    kept = {
        f"model.{key}": value
        for key, value in source.model.state_dict().items()
        if key != "norm.weight" and not (key.startswith("layers.") and int(key.split(".")[1]) >= n_layers)
    }
    head = {
        "model.norm.weight": torch.ones_like(source.model.norm.weight),
        "score.weight": result.weight[i, : result.widths[i]].T.contiguous().to(dtype),
        "score.bias": result.bias[i].to(dtype),
    }
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        if standalone:
            _write_standalone(tmp, config, {**kept, **head}, dtype)
            model.tokenizer.save_pretrained(tmp)
        else:
            config.probe_base_checkpoint = base
            config.probe_layer = n_layers
            config.probe_base_weights = tensors_digest(kept.items())
            config.save_pretrained(tmp)
            save_file(head, str(tmp / PROBE_FILE))
        provenance = _provenance(result, i, model, hook, n_layers, base)
        provenance["files"] = sorted([p.name for p in tmp.iterdir()] + ["probe.json"])
        (tmp / "probe.json").write_text(json.dumps(provenance, indent=1, default=str))
        _swap_in(tmp, folder)
    finally:
        if tmp.exists():
            _remove_written(tmp, [p.name for p in tmp.iterdir()])
    return folder


def is_probe_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a small probe export (a head to load on top of a base checkpoint)."""
    return (Path(folder) / PROBE_FILE).is_file() and (Path(folder) / "config.json").is_file()


def load_probe_tagger(folder: str | Path, *, base: str | Path | None = None, **hf_kwargs: Any):
    """The exported probe in ``folder`` as an `ApertusForTokenClassification` (in eval mode)::

        tagger = load_probe_tagger("probes/pos-layer2")

    A small export is built from its base checkpoint (``from_pretrained`` of the base with the export's
    config, so only the first ``l`` layers are read) with the head on top; ``base`` overrides where the base
    is (e.g. a copy on another machine), and the base's kept weights must be the ones the probe was trained
    on. A standalone export loads directly. ``hf_kwargs`` go to ``from_pretrained`` (``device_map``, ...).
    """
    folder = Path(folder)
    if not is_probe_folder(folder):
        if (folder / "config.json").is_file():  # a standalone export, or any token-classification checkpoint
            return ApertusForTokenClassification.from_pretrained(folder, **hf_kwargs).eval()
        raise FileNotFoundError(
            f"{folder} holds no exported probe ({PROBE_FILE} and config.json): export one with "
            "probing.export_probe(result, layer, folder, model)."
        )
    config = AutoConfig.from_pretrained(folder)
    base = str(base if base is not None else config.probe_base_checkpoint)
    hf_kwargs.setdefault("dtype", config.dtype)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the base's later layers and lm_head are unused by design: no report
    try:
        tagger, info = ApertusForTokenClassification.from_pretrained(
            base, config=config, output_loading_info=True, **hf_kwargs
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info["missing_keys"] if not k.startswith("score.")]
    if missing:
        raise ValueError(
            f"The base checkpoint {base} lacks weights the tagger needs: {missing[:8]}: point base= at the "
            "checkpoint the probe was exported from."
        )
    head = load_file(folder / PROBE_FILE)
    kept = {k: v for k, v in tagger.state_dict().items() if k not in head}
    if tensors_digest(kept.items()) != config.probe_base_weights:
        raise ValueError(
            f"The base checkpoint {base} does not hold the weights this probe was trained on (its first "
            f"{config.probe_layer} layers or embeddings differ): pass base= the checkpoint the probe was "
            "exported from."
        )
    with torch.no_grad():
        for key, value in head.items():
            tagger.get_parameter(key).copy_(value)
    return tagger.eval()


def _write_standalone(
    folder: Path, config: Any, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """config.json and model.safetensors, written from the model's own tensors.

    Building the classifier and saving it would hold a second full copy of the kept layers (plus their random
    initialisation); safetensors writes each tensor from its own memory, so nothing is copied but tensors of
    another dtype (usually none: the model is loaded in one dtype) and the new head. The names and shapes are
    checked against the classifier built on the meta device (no memory), as ``load_state_dict(strict=True)``
    would.
    """
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ApertusForTokenClassification(config).state_dict().items()}
    given = {k: tuple(v.shape) for k, v in tensors.items()}
    if given != expected:
        missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        wrong = sorted(k for k in set(given) & set(expected) if given[k] != expected[k])
        raise RuntimeError(
            f"The tagger's weights do not match ApertusForTokenClassification: missing {missing}, unexpected "
            f"{unexpected}, wrong shape {wrong}. Please report this with the model's config."
        )
    config.save_pretrained(folder)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}  # no copy when already so
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _tagger_config(source_config: Any, result: ProbeResult, n_layers: int, dtype: torch.dtype) -> Any:
    config = copy.deepcopy(source_config)
    config.num_hidden_layers = n_layers
    config.architectures = ["ApertusForTokenClassification"]
    config.id2label = dict(enumerate(result.label_names))
    config.label2id = {name: k for k, name in enumerate(result.label_names)}
    config.num_labels = len(result.label_names)
    config.classifier_dropout = 0.0
    config.dtype = dtype
    return config


def _base_checkpoint(model: Any, base: str | Path | None) -> str:
    name = str(base if base is not None else model.cfg.model_name)
    if Path(name).is_dir():
        return str(Path(name).resolve())
    if _HUB_ID.fullmatch(name):
        return name
    raise ValueError(
        f"A small probe export names its base checkpoint, but {name!r} is neither a folder nor a hub id "
        "(the model was not loaded from a checkpoint): pass base='path/to/checkpoint' (what the model was "
        "loaded from), or standalone=True for a self-contained copy."
    )


def _provenance(result: ProbeResult, i: int, model: Any, hook: str, n_layers: int, base) -> dict:
    row = result.table.iloc[i].to_dict()
    return {
        "source_model": model.cfg.model_name,
        "source_identity": result.model_identity,
        "base_checkpoint": base,
        "hook": hook,
        "layers_kept": n_layers,
        "features": "residual stream RMS-normalised (final norm weight = 1), eps from the source config",
        "labels": result.label_names,
        "test_scores": {
            k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in row.items()
        },
        "settings": {k: v for k, v in result.settings.items() if k != "model"},
    }


def _written_before(folder: Path) -> list[str] | None:
    try:
        return list(json.loads((folder / "probe.json").read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_target(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file: export into a folder.")
    if not folder.exists() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True or another folder.")
    written = _written_before(folder)
    others = sorted(p.name for p in folder.iterdir() if written is None or p.name not in written)
    if others:
        raise FileExistsError(
            f"{folder} holds files that no probe export wrote ({', '.join(others[:5])}"
            f"{' ...' if len(others) > 5 else ''}); overwrite=True replaces only a previous export, never "
            "other files: export into another folder, or move those files away."
        )


def _swap_in(tmp: Path, folder: Path) -> None:
    """Put the new checkpoint at ``folder`` with renames: the old one moves aside first and comes back if the
    new one cannot be moved in, so some complete checkpoint is at ``folder`` whatever fails."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    _remove_written(old, _written_before(old) or [])


def _remove_written(folder: Path, names: list[str]) -> None:
    # Files by name, then the folder only if it is empty: nothing the export did not write is deleted.
    for name in names:
        path = folder / name
        if path.is_file() and not path.is_symlink():
            path.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


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
    if isinstance(model, (str, Path)) and is_probe_folder(model):
        tagger = load_probe_tagger(model)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tagger.config.probe_base_checkpoint)
        model = HookedApertus(tagger, tokenizer, name=str(checkpoint_or_model))
    elif isinstance(model, (str, Path)):
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
        for chunk in batches(range(len(data)), batch_size):
            indices = list(chunk)
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
