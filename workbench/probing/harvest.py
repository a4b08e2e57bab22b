"""Harvesting hidden states for probing: one forward per batch, every requested hook, labelled tokens only.

:func:`harvest` runs the model over an :class:`~workbench.data.alignment.EncodedDataset` and writes, for every
labelled token, the activation at each hook (default: the residual stream entering the first layer and
after every layer) with its label, word type, sentence and position. The forward stops after the last layer
a hook needs (``stop_at_layer``) and the hooks keep only the labelled positions, so nothing else is stored.

On disk a harvest is a folder of safetensors shards (one per ``shard_sentences`` sentences, written to a
temporary name and renamed) and a ``manifest.json`` listing the finished shards; the folder is a local path or
any fsspec URL (:mod:`workbench.probing.storage`). Memory is bounded by one
shard whatever the dataset size; an interrupted harvest resumes from the manifest when called again with
the same model, data and hooks (a fingerprint of all three is checked).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from workbench import executors
from workbench.data.alignment import IGNORE, EncodedDataset, TokenLabelledDataset
from workbench.identity import model_identity
from workbench.inputs import batches
from workbench.probing.storage import LocalFolder, UrlFolder, open_folder

__all__ = [
    "CorruptHarvestError",
    "Harvest",
    "harvest",
    "hook_layer",
    "is_residual_hook",
    "model_fingerprint",
    "residual_hooks",
]

MANIFEST = "manifest.json"
COLUMNS = ("labels", "types", "sentence", "position")
FORMAT = "workbench-probing-harvest/1"
# Hooks laid out [batch, head, pos, ...]: not one vector per token, so not something to probe token by token.
_NOT_PER_TOKEN = ("hook_q_normed", "hook_k_normed", "hook_attn_scores", "hook_pattern")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_SHARD_NAME = re.compile(r"shard-\d{5}\.safetensors")
# Every file a harvest writes (a shard or the manifest, or either's temporary name): the only files that
# overwrite=True may remove.
_OWN_FILE = re.compile(r"(shard-\d{5}\.safetensors|manifest\.json)(\.tmp)?")


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


def model_fingerprint(model: Any) -> dict:
    """What a harvest records of its model: the identity of every weight (:func:`workbench.identity.
    model_identity`) and the fields the probes need."""
    c = model.cfg
    return {
        "name": c.model_name,
        "n_layers": c.n_layers,
        "d_model": c.d_model,
        "eps": c.eps,
        "weights": model_identity(model),
    }


def attached_hooks(model: Any) -> list[str]:
    """Hook points that hold hooks outside the harvest's own (they may change the activations)."""
    return sorted(name for name, point in model.hook_dict.items() if point.fwd_hooks)


class CorruptHarvestError(ValueError):
    """A harvest folder whose manifest or shards do not match what was written."""


def _fix(folder: Any) -> str:
    return f"rerun harvest(..., {str(folder)!r}, overwrite=True) to recompute it"


def _read_manifest(folder: LocalFolder | UrlFolder) -> dict:
    path = folder.where(MANIFEST)
    try:
        manifest = json.loads(folder.read_text(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptHarvestError(
            f"{path} is not valid JSON ({error}; truncated by an interrupted write?): {_fix(folder)}."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CorruptHarvestError(
            f"{path} is not a probing harvest (format {found!r}, expected {FORMAT}): {_fix(folder)}, "
            "or harvest into another folder."
        )
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "file" in s for s in shards):
        raise CorruptHarvestError(f"{path} has no valid shard list: {_fix(folder)}.")
    for shard in shards:
        _inside(folder, shard["file"])
    return manifest


def _inside(folder: LocalFolder | UrlFolder, name: Any) -> str:
    # A manifest names files of its own folder only: no absolute paths, no "..", no sub-folders, no links out.
    if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
        raise CorruptHarvestError(
            f"The manifest of {folder} names the shard {name!r}, which is not a shard file of that folder "
            f"(expected a name like shard-00000.safetensors): the harvest is corrupt and is not read; "
            f"{_fix(folder)} (files outside the folder are never touched)."
        )
    if folder.leads_outside(name):
        raise CorruptHarvestError(
            f"{folder.where(name)} leads outside the harvest folder: the harvest is corrupt and is not read; "
            f"{_fix(folder)}."
        )
    return name


def _verify_shard(folder: LocalFolder | UrlFolder, shard: dict) -> None:
    """The shard's file exists with the size and XXH3-128 checksum the manifest recorded."""
    name = _inside(folder, shard["file"])
    if not folder.is_file(name):
        problem = "is missing"
    elif "bytes" not in shard or "xxh3_128" not in shard:
        problem = "has no checksum in the manifest (written by an older workbench)"
    elif (size := folder.size(name)) != shard["bytes"]:
        problem = f"has {size} bytes, the manifest recorded {shard['bytes']} (truncated?)"
    elif folder.digest(name) != shard["xxh3_128"]:
        problem = "does not match its checksum in the manifest (edited, swapped or damaged)"
    else:
        return
    raise CorruptHarvestError(f"Shard {shard['file']} of the harvest in {folder} {problem}: {_fix(folder)}.")


@dataclass
class Harvest:
    """A harvest folder: the manifest and, on demand, the features (shards verified, then read one by one).

    folder: a local path, or an fsspec URL (``s3://bucket/harvest``, ``memory://...``) kept as that string."""

    folder: Path | str
    manifest: dict

    @classmethod
    def open(cls, folder: str | Path) -> Harvest:
        """The harvest in ``folder``: a local path or any fsspec URL."""
        storage = open_folder(folder)
        if not storage.has(MANIFEST):
            raise FileNotFoundError(
                f"{storage} holds no harvest ({MANIFEST} missing): run probing.harvest(...) first."
            )
        return cls(storage.location, _read_manifest(storage))

    @cached_property
    def _storage(self) -> LocalFolder | UrlFolder:
        return open_folder(self.folder)

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

    @property
    def model_identity(self) -> str:
        """The identity of the model the activations came from (:func:`workbench.identity.model_identity`)."""
        return self.manifest["model"]["weights"]

    def verify(self) -> None:
        """Check that the harvest is complete and every shard is the file that was written (size and XXH3-128
        checksum); a bad shard raises :class:`CorruptHarvestError` naming it and the fix."""
        if not self.complete:
            raise RuntimeError(
                f"The harvest in {self.folder} is incomplete ({len(self.manifest['shards'])} of "
                f"{self.manifest['n_shards']} shards): call harvest(...) "
                "again with the same arguments to finish it."
            )
        for shard in self.manifest["shards"]:
            _verify_shard(self._storage, shard)

    def check_hooks(self, hooks: list[str]) -> list[str]:
        unknown = [h for h in hooks if h not in self.hooks]
        if unknown:
            raise KeyError(f"Hooks {unknown} were not harvested; this harvest has {self.hooks}.")
        return list(hooks)

    def row_shape(self, key: str) -> tuple[int, ...]:
        """The shape of one row of a harvested tensor (a hook's ``(width,)``), read from the first shard's
        header without reading its data."""
        if not self.manifest["shards"]:
            raise RuntimeError(
                f"The harvest in {self.folder} has no shard yet: call harvest(...) to write one."
            )
        return tuple(self.shard_shape(0, key)[1:])

    def shard_tensors(self, key: str, *, verify: bool = True) -> Iterator[torch.Tensor]:
        """One harvested tensor (a hook or a column), shard by shard: memory for one shard's piece at a time.
        Each piece's row count is checked against the manifest."""
        if verify:
            self.verify()
        for index, shard in enumerate(self.manifest["shards"]):
            tensor = self.shard_tensor(index, key)
            if tensor.shape[0] != shard["tokens"]:
                raise CorruptHarvestError(
                    f"Shard {shard['file']} of the harvest in {self.folder} holds {tensor.shape[0]} rows of "
                    f"{key!r}, the manifest recorded {shard['tokens']}: {_fix(self.folder)}."
                )
            yield tensor

    def shard_tensor(self, index: int, key: str) -> torch.Tensor:
        """One tensor of the ``index``-th finished shard, read as it is (:meth:`verify` checks checksums)."""
        return self._read_shard(index, key, "tensor")

    def shard_shape(self, index: int, key: str) -> list[int]:
        """The shape of one tensor of the ``index``-th finished shard, read from the file's header only."""
        return self._read_shard(index, key, "shape")

    def _read_shard(self, index: int, key: str, what: str) -> Any:
        shard = self.manifest["shards"][index]
        name = _inside(self._storage, shard["file"])
        found = getattr(self._storage, what)(name, key)
        if found is None:
            raise CorruptHarvestError(
                f"Shard {shard['file']} of the harvest in {self.folder} has no {key!r}: {_fix(self.folder)}."
            )
        return found

    def load(self, hooks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Every labelled token: ``{hook name: [n, width]}`` features plus labels, types, sentence,
        position. The shards are verified first; each result is allocated once and filled shard by shard."""
        self.verify()
        hooks = self.check_hooks(self.hooks if hooks is None else hooks)
        out = {}
        for key in [*hooks, *COLUMNS]:
            result, row = None, 0
            for piece in self.shard_tensors(key, verify=False):
                if result is None:
                    result = torch.empty((self.n_tokens, *piece.shape[1:]), dtype=piece.dtype)
                result[row : row + len(piece)] = piece
                row += len(piece)
            out[key] = result
        return out

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
    executor: Any = None,
) -> Harvest:
    """Run ``model`` over ``data`` and store each labelled token's activation at every hook in ``folder``.

    folder: a local path, or any fsspec URL (``s3://bucket/harvests/ewt``, ``gs://...``, ``file:///shared/...``;
        the filesystem's fsspec package, e.g. s3fs, installed and its credentials configured as usual).

    data: an :class:`EncodedDataset`, or a :class:`TokenLabelledDataset`, then encoded with the model's
        tokenizer, labels on each word's first sub-token (``data.encode(...)`` yourself for other choices).

    hooks: hook names (default :func:`residual_hooks`: the residual stream after 0..n_layers layers);
        any hook with one vector per token works (residual stream, attn/mlp outputs, hook_z, mlp.hook_post,
        ...).
    shard_sentences: sentences per shard, which bounds memory; batch_size: sentences per forward.
    dtype: the storage dtype of the features, a floating dtype (float32, bfloat16, float16).
    overwrite: replace a harvest of another model, data or hooks in ``folder``, or a damaged one (otherwise
        that is an error). Only the files a harvest writes (``manifest.json``, ``shard-NNNNN.safetensors``)
        are removed; a folder that holds any other file is refused. A harvest of the same model, data and
        hooks resumes where it stopped (after checking every finished shard's checksum), and a finished one
        is returned as it is.
    executor: where the shards are computed: None runs them here, in order; a
        :class:`workbench.executors.RayExecutor` runs them on Ray workers (one model replica each) that write
        their shards into ``folder`` (a path every worker sees, or a URL every worker reaches), recorded in
        the manifest with the worker's name. The files are the same bytes either way.
    The model is identified by a hash of every weight (:func:`workbench.identity.model_identity`): a harvest
    never mixes the activations of two models. Hooks already attached to the model are recorded, and resuming
    with others attached warns (an observing hook changes nothing; an editing one would).
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
    for what, value in (("batch_size", batch_size), ("shard_sentences", shard_sentences)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{what} must be a whole number of sentences, at least 1 (got {value!r}).")
    dtype = _storage_dtype(dtype)
    if len(data) == 0:
        raise ValueError("The dataset has no sentences.")
    if data.n_labelled == 0:
        raise ValueError(
            f"The dataset's {len(data)} sentences have no labelled token (every label is None or on a "
            "special token), so there is nothing to probe: label some words, or check the column you read."
        )

    storage = open_folder(folder)
    n_shards = -(-len(data) // shard_sentences)
    manifest = {
        "format": FORMAT,
        "model": model_fingerprint(model),
        "attached_hooks": attached_hooks(model),
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
    manifest = _start_or_resume(storage, manifest, overwrite)
    done = {shard["index"] for shard in manifest["shards"]}
    stop = _stop_at_layer(hooks, model.cfg.n_layers)

    total = sum(len(data.input_ids[i]) for i in range(len(data)))
    skipped = sum(len(data.input_ids[i]) for k in done for i in _shard_range(k, shard_sentences, len(data)))
    bar = tqdm(total=total, initial=skipped, unit="tok", desc="harvest", disable=not progress)
    job = partial(
        write_shard,
        data=data,
        folder=str(storage),
        hooks=hooks,
        stop=stop,
        batch_size=batch_size,
        shard_sentences=shard_sentences,
        dtype=dtype,
    )
    todo = [k for k in range(n_shards) if k not in done]
    try:
        for _, record, worker in executors.resolve(executor).map(model, job, todo, bar.update):
            if record["worker_tokens_seen"] and worker != "local":
                bar.update(record["worker_tokens_seen"])
            del record["worker_tokens_seen"]
            manifest["shards"].append({**record, "worker": worker})
            manifest["shards"].sort(key=lambda shard: shard["index"])
            manifest["complete"] = len(manifest["shards"]) == n_shards
            _write_manifest(storage, manifest)
    finally:
        bar.close()
    return Harvest(storage.location, manifest)


def write_shard(
    model, k: int, progress, *, data, folder, hooks, stop, batch_size, shard_sentences, dtype
) -> dict:
    """Harvest shard `k` into `folder` (a path or URL; written atomically) and return its manifest record: the
    job an executor runs, in this process or on a worker that sees the same folder."""
    sentences = _shard_range(k, shard_sentences, len(data))
    seen = []
    tensors = _harvest_shard(model, data, sentences, hooks, stop, batch_size, dtype, progress or seen.append)
    name = f"shard-{k:05d}.safetensors"
    size, digest = open_folder(folder).write_tensors(name, tensors)
    return {
        "index": k,
        "file": name,
        "sentences": [sentences.start, sentences.stop],
        "tokens": int(tensors["labels"].shape[0]),
        "bytes": size,
        "xxh3_128": digest,
        "worker_tokens_seen": sum(seen),
    }


def _shard_range(k: int, shard_sentences: int, n: int) -> range:
    return range(k * shard_sentences, min((k + 1) * shard_sentences, n))


def _harvest_shard(
    model, data, sentences: range, hooks, stop, batch_size, dtype, progress
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
        for chunk in batches(sentences, batch_size):
            indices = list(chunk)
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
            progress(int(batch["attention_mask"].sum()))
    if at["row"] != n_labelled or set(out) != set(hooks):
        raise RuntimeError(
            f"Harvest shard filled {at['row']} of {n_labelled} rows; hooks seen: {sorted(out)}."
        )
    return {**out, **columns}


_SAME = ("format", "model", "data", "hooks", "dtype", "shard_sentences")


def _start_or_resume(folder: LocalFolder | UrlFolder, manifest: dict, overwrite: bool) -> dict:
    if folder.is_file_itself():
        raise NotADirectoryError(f"{folder} is a file, not a folder: harvest into a folder.")
    if folder.has(MANIFEST):
        try:
            old = _read_manifest(folder)
        except CorruptHarvestError:
            if not overwrite:
                raise
            old = None  # overwrite=True recovers: the harvest's own files are replaced below
        if old is not None:
            differs = [key for key in _SAME if old.get(key) != manifest[key]]
            if not differs and _resumable(folder, old, overwrite):
                if old.get("attached_hooks") != manifest["attached_hooks"]:
                    warnings.warn(
                        f"Resuming the harvest in {folder}, begun with hooks attached at "
                        f"{old.get('attached_hooks')}, now at {manifest['attached_hooks']}: if a hook "
                        "changes activations, the shards disagree (overwrite=True starts again).",
                        stacklevel=3,
                    )
                return old
            if differs and not overwrite:
                raise FileExistsError(
                    f"{folder} holds a harvest of {_difference(differs, old, manifest)}: resuming would mix "
                    "them. Pass overwrite=True to replace it, or harvest into another folder."
                )
    if folder.exists():
        _remove_own_files(folder, overwrite)
    folder.make()
    _write_manifest(folder, manifest)
    return manifest


def _resumable(folder: LocalFolder | UrlFolder, old: dict, overwrite: bool) -> bool:
    """Whether every finished shard is intact (then the harvest resumes); a damaged one is an error, or with
    overwrite=True a reason to start again."""
    try:
        for shard in old["shards"]:
            _verify_shard(folder, shard)
    except CorruptHarvestError:
        if not overwrite:
            raise
        return False
    return True


def _difference(differs: list[str], old: dict, new: dict) -> str:
    if "model" in differs:
        was, now = old.get("model") or {}, new["model"]
        if was.get("weights") != now["weights"]:
            return (
                f"another model (weights {str(was.get('weights'))[:12]}..., this model's are "
                f"{now['weights'][:12]}...)"
            )
    return "another " + "/".join(key for key in differs if key != "format")


def _remove_own_files(folder: LocalFolder | UrlFolder, overwrite: bool) -> None:
    """Empty the folder of a harvest's own files; refuse when anything else is there."""
    entries = folder.entries()
    own = [name for name, plain_file in entries if plain_file and _OWN_FILE.fullmatch(name)]
    others = [name for name, _ in entries if name not in own]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise FileExistsError(
            f"{folder} holds files that no harvest wrote ({shown}); a harvest only replaces its own files "
            "(manifest.json, shard-NNNNN.safetensors), so it never deletes yours: harvest into a new or "
            "empty folder, or move those files away."
        )
    if own and not overwrite:
        raise FileExistsError(
            f"{folder} holds harvest files but no valid manifest: pass overwrite=True to replace them, "
            "or harvest into another folder."
        )
    for name in own:
        folder.remove(name)


def _storage_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype={dtype!r} cannot hold activations: use a floating dtype, torch.float32 (default), "
            "torch.bfloat16 or torch.float16."
        )
    return dtype


def _write_manifest(folder: LocalFolder | UrlFolder, manifest: dict) -> None:
    folder.write_text(MANIFEST, json.dumps(manifest, indent=1))
