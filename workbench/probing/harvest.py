"""Harvesting hidden states for probing: one forward per batch, every requested hook, labelled tokens only.

:func:`harvest` runs the model over an :class:`~workbench.data.alignment.EncodedDataset` and writes, for every
labelled token, the activation at each hook (default: the residual stream entering the first layer and
after every layer) with its label, word type, sentence and position. The forward stops after the last layer
a hook needs (``stop_at_layer``) and the hooks keep only the labelled positions, so nothing else is stored.

On disk a harvest is a folder of safetensors shards (one per ``shard_sentences`` sentences, written to a
temporary name and renamed) and a ``manifest.json`` listing the finished shards. Memory is bounded by one
shard whatever the dataset size; an interrupted harvest resumes from the manifest when called again with
the same model, data and hooks (a fingerprint of all three is checked).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from workbench.data.alignment import IGNORE, EncodedDataset, TokenLabelledDataset

__all__ = ["Harvest", "harvest", "hook_layer", "is_residual_hook", "residual_hooks"]

MANIFEST = "manifest.json"
FORMAT = "workbench-probing-harvest/1"
# Hooks laid out [batch, head, pos, ...]: not one vector per token, so not something to probe token by token.
_NOT_PER_TOKEN = ("hook_q_normed", "hook_k_normed", "hook_attn_scores", "hook_pattern")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def residual_hooks(n_layers: int) -> list[str]:
    """The residual stream after 0, 1, ..., n_layers layers (0: the embeddings entering the first layer)."""
    return ["blocks.0.hook_resid_pre", *(f"blocks.{layer}.hook_resid_post" for layer in range(n_layers))]


def hook_layer(name: str, n_layers: int) -> int:
    """How many decoder layers have run when the hook fires: resid_pre of layer l -> l, resid_post -> l + 1,
    any other hook inside block l -> l, the embeddings -> 0, the final norm -> n_layers."""
    if name == "hook_embed":
        return 0
    if name.startswith("ln_final."):
        return n_layers
    match = _BLOCK.match(name)
    if not match:
        raise KeyError(f"Cannot place hook {name!r} in a layer.")
    layer = int(match.group(1))
    return layer + 1 if match.group(2) == "hook_resid_post" else layer


def is_residual_hook(name: str) -> bool:
    """Whether the hook is the residual stream itself (what a truncated model's last hidden state is)."""
    return name == "hook_embed" or name.endswith(".hook_resid_pre") or name.endswith(".hook_resid_post")


def _stop_at_layer(hooks: list[str], n_layers: int) -> int | None:
    # The last block any hook sits in decides how far the forward has to go.
    if any(name.startswith("ln_final.") for name in hooks):
        return None
    last = -1
    for name in hooks:
        match = _BLOCK.match(name)
        if match:
            last = max(last, int(match.group(1)))
    return last + 1


def _model_identity(model: Any) -> dict:
    c = model.cfg
    # A few weights stand for the model: the same shapes but other weights give another checksum.
    probe = [model.W_E[:4].float(), model.hf_model.model.norm.weight.float()]
    for layer in model.hf_model.model.layers[:2]:
        probe.append(layer.mlp.down_proj.weight[:4].float())
    digest = hashlib.sha256(b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in probe))
    return {
        "name": c.model_name,
        "n_layers": c.n_layers,
        "d_model": c.d_model,
        "eps": c.eps,
        "weights": digest.hexdigest()[:16],
    }


@dataclass
class Harvest:
    """A harvest folder: the manifest and, on demand, the features (all shards loaded and concatenated)."""

    folder: Path
    manifest: dict

    @classmethod
    def open(cls, folder: str | Path) -> Harvest:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.exists():
            raise FileNotFoundError(
                f"{folder} holds no harvest ({MANIFEST} missing): run probing.harvest(...) first."
            )
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a probing harvest (format {manifest.get('format')!r}, expected {FORMAT})."
            )
        return cls(folder, manifest)

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def label_names(self) -> list[str]:
        return list(self.manifest["label_names"])

    @property
    def type_names(self) -> list[str]:
        return list(self.manifest["type_names"])

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    @property
    def n_tokens(self) -> int:
        return sum(shard["tokens"] for shard in self.manifest["shards"])

    def load(self, hooks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Every labelled token: ``{hook name: [n, width]}`` features plus labels, types, sentence,
        position."""
        if not self.complete:
            raise RuntimeError(
                f"The harvest in {self.folder} is incomplete ({len(self.manifest['shards'])} of "
                f"{self.manifest['n_shards']} shards): call harvest(...) "
                "again with the same arguments to finish it."
            )
        hooks = self.hooks if hooks is None else hooks
        unknown = [h for h in hooks if h not in self.hooks]
        if unknown:
            raise KeyError(f"Hooks {unknown} were not harvested; this harvest has {self.hooks}.")
        keys = [*hooks, "labels", "types", "sentence", "position"]
        parts: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
        for shard in self.manifest["shards"]:
            tensors = load_file(self.folder / shard["file"])
            for key in keys:
                parts[key].append(tensors[key])
        return {key: torch.cat(values) for key, values in parts.items()}

    def __repr__(self) -> str:
        m = self.manifest
        state = "complete" if self.complete else f"{len(m['shards'])}/{m['n_shards']} shards"
        return f"Harvest({str(self.folder)!r}: {self.n_tokens} tokens x {len(m['hooks'])} hooks, {state})"


def harvest(
    model: Any,
    data: EncodedDataset | TokenLabelledDataset,
    folder: str | Path,
    *,
    hooks: list[str] | None = None,
    batch_size: int = 16,
    shard_sentences: int = 512,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = True,
) -> Harvest:
    """Run ``model`` over ``data`` and store each labelled token's activation at every hook in ``folder``.

    data: an :class:`EncodedDataset`, or a :class:`TokenLabelledDataset`, then encoded with the model's
        tokenizer, labels on each word's first sub-token (``data.encode(...)`` yourself for other choices).

    hooks: hook names (default :func:`residual_hooks`: the residual stream after 0..n_layers layers);
        any hook with one vector per token works (residual stream, attn/mlp outputs, hook_z, mlp.hook_post,
        ...).
    shard_sentences: sentences per shard, which bounds memory; batch_size: sentences per forward.
    overwrite: replace a harvest of other data in ``folder`` (otherwise that is an error); a harvest of the
        same data resumes where it stopped, and a finished one is returned as it is.
    """
    if isinstance(data, TokenLabelledDataset):
        data = data.encode(model.tokenizer)
    elif not isinstance(data, EncodedDataset):
        raise TypeError(
            f"harvest needs a TokenLabelledDataset or an EncodedDataset, not {type(data).__name__}: "
            "build one with TokenLabelledDataset.from_tagged(...) or workbench.data.conllu.read_conllu(...)."
        )
    hooks = residual_hooks(model.cfg.n_layers) if hooks is None else list(hooks)
    if not hooks:
        raise ValueError(
            "No hooks given: pass hook names, or None for the residual stream after every layer."
        )
    for name in hooks:
        model.check_hook_name(name)
        if name.endswith(_NOT_PER_TOKEN):
            raise ValueError(
                f"{name} is laid out per head and query ([batch, "
                "head, pos, ...]), not one vector per token; probe "
                "attn.hook_q / hook_rot_q / hook_z or the residual stream instead."
            )
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"Hooks listed twice: {hooks}.")
    if batch_size < 1 or shard_sentences < 1:
        raise ValueError("batch_size and shard_sentences must be at least 1.")
    if len(data) == 0:
        raise ValueError("The dataset has no sentences.")

    folder = Path(folder)
    n_shards = -(-len(data) // shard_sentences)
    manifest = {
        "format": FORMAT,
        "model": _model_identity(model),
        "data": data.fingerprint(),
        "subtokens": data.subtokens,
        "hooks": hooks,
        "layers": [hook_layer(h, model.cfg.n_layers) for h in hooks],
        "dtype": str(dtype).removeprefix("torch."),
        "label_names": list(data.label_names),
        "type_names": list(data.type_names),
        "n_sentences": len(data),
        "shard_sentences": shard_sentences,
        "n_shards": n_shards,
        "complete": False,
        "shards": [],
    }
    manifest = _start_or_resume(folder, manifest, overwrite)
    done = {shard["index"] for shard in manifest["shards"]}
    stop = _stop_at_layer(hooks, model.cfg.n_layers)

    total = sum(len(data.input_ids[i]) for i in range(len(data)))
    skipped = sum(len(data.input_ids[i]) for k in done for i in _shard_range(k, shard_sentences, len(data)))
    bar = tqdm(total=total, initial=skipped, unit="tok", desc="harvest", disable=not progress)
    try:
        for k in range(n_shards):
            if k in done:
                continue
            sentences = _shard_range(k, shard_sentences, len(data))
            tensors = _harvest_shard(model, data, sentences, hooks, stop, batch_size, dtype, bar)
            name = f"shard-{k:05d}.safetensors"
            _write_atomic(folder / name, lambda tmp, t=tensors: save_file(t, tmp))
            manifest["shards"].append(
                {
                    "index": k,
                    "file": name,
                    "sentences": [sentences.start, sentences.stop],
                    "tokens": int(tensors["labels"].shape[0]),
                }
            )
            manifest["shards"].sort(key=lambda shard: shard["index"])
            manifest["complete"] = len(manifest["shards"]) == n_shards
            _write_manifest(folder, manifest)
    finally:
        bar.close()
    return Harvest(folder, manifest)


def _shard_range(k: int, shard_sentences: int, n: int) -> range:
    return range(k * shard_sentences, min((k + 1) * shard_sentences, n))


def _harvest_shard(
    model, data, sentences: range, hooks, stop, batch_size, dtype, bar
) -> dict[str, torch.Tensor]:
    n_labelled = sum(1 for i in sentences for label in data.labels[i] if label != IGNORE)
    # The shard's buffers are allocated once and filled in place: no per-batch copies to concatenate later.
    out: dict[str, torch.Tensor] = {}
    at = {"row": 0, "index": None}

    def keep(activation: torch.Tensor, hook) -> None:
        # Only the labelled positions leave the forward: [n_labelled, width] in the storage dtype, on the CPU.
        flat = activation.reshape(activation.shape[0] * activation.shape[1], -1)
        picked = flat.index_select(0, at["index"].to(flat.device))
        if hook.name not in out:
            out[hook.name] = torch.empty(n_labelled, picked.shape[1], dtype=dtype)
        out[hook.name][at["row"] : at["row"] + picked.shape[0]] = picked

    columns = {
        key: torch.empty(n_labelled, dtype=torch.long) for key in ("labels", "types", "sentence", "position")
    }
    with torch.inference_mode(), model.hooks(fwd_hooks=[(name, keep) for name in hooks]):
        for start in range(sentences.start, sentences.stop, batch_size):
            indices = list(range(start, min(start + batch_size, sentences.stop)))
            batch = data.batch(indices)
            mask = batch["labels"] != IGNORE
            rows, cols = mask.nonzero(as_tuple=True)
            at["index"] = rows * mask.shape[1] + cols
            model(
                batch["input_ids"],
                attention_mask=batch["attention_mask"],
                return_type=None,
                stop_at_layer=stop,
            )
            span = slice(at["row"], at["row"] + len(rows))
            columns["labels"][span] = batch["labels"][rows, cols]
            columns["types"][span] = batch["types"][rows, cols]
            columns["sentence"][span] = torch.tensor(indices)[rows]
            columns["position"][span] = cols
            at["row"] += len(rows)
            bar.update(int(batch["attention_mask"].sum()))
    if at["row"] != n_labelled or set(out) != set(hooks):
        raise RuntimeError(
            f"Harvest shard filled {at['row']} of {n_labelled} rows; hooks seen: {sorted(out)}."
        )
    return {**out, **columns}


def _start_or_resume(folder: Path, manifest: dict, overwrite: bool) -> dict:
    path = folder / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        same = all(
            old.get(key) == manifest[key]
            for key in ("format", "model", "data", "hooks", "dtype", "shard_sentences")
        )
        if same:
            return old
        if not overwrite:
            differs = [
                key
                for key in ("model", "data", "hooks", "dtype", "shard_sentences")
                if old.get(key) != manifest[key]
            ]
            raise FileExistsError(
                f"{folder} holds a harvest of another {'/'.join(differs)}; "
                "pass overwrite=True to replace it, or "
                "harvest into another folder."
            )
        for shard in old.get("shards", []):
            (folder / shard["file"]).unlink(missing_ok=True)
        path.unlink()
    elif folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} is not empty and holds no harvest: choose an empty or new folder.")
    elif folder.exists() and overwrite:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_manifest(folder, manifest)
    return manifest


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _write_manifest(folder: Path, manifest: dict) -> None:
    _write_atomic(folder / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
