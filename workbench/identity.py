"""What a model is, as one string: a hash over every parameter tensor, so files from two models never mix.

:func:`model_identity` hashes the name, shape, dtype and *every byte* of every tensor of
``model.hf_model.state_dict()`` (with XXH3-128, about 10 GB/s on one CPU core: Apertus-8B's 16 GB of bf16 in
a couple of seconds, GPU tensors copied over in 64 MB pieces) and the architecture's config. Any change to
any weight -- one attention matrix negated, one element edited, another dtype -- gives another identity
(XXH3-128 is not cryptographic: accidental collisions have probability about 2^-128; it is no defence
against someone forging weights on purpose).

The full hash is computed once per model and cached. The cache is checked against a cheap stamp on every
call: each tensor's storage address, its version counter (bumped by every in-place edit through the
parameter, e.g. ``with torch.no_grad(): w.neg_()`` or ``load_state_dict``) and a strided sample of up to 4096
of its elements. A changed stamp recomputes the full hash. The one change the stamp can miss is an edit
through ``.data`` (which has its own version counter) of elements outside the sample, made after the model's
identity was first computed; :func:`model_identity` with ``refresh=True`` always hashes everything.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import xxhash

__all__ = ["model_identity", "tensors_digest", "file_digest"]

_CHUNK = 64 << 20  # bytes hashed per piece: bounds the extra memory for GPU (or non-contiguous) tensors
_SAMPLE = 4096  # elements of each tensor in the cache's stamp
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Config fields that name or describe a checkpoint without changing what it computes.
_NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"}


def model_identity(model: Any, *, refresh: bool = False) -> str:
    """A 32-hex-digit identity of ``model`` (a `HookedApertus` or a transformers model): every parameter and
    buffer byte, every name, shape and dtype, and the config fields that change the computation."""
    hf_model = getattr(model, "hf_model", model)
    state = hf_model.state_dict()
    stamp = _stamp(state)
    cached = None if refresh else _cache.get(hf_model)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    digest = xxhash.xxh3_128()
    digest.update(_architecture(hf_model).encode())
    digest.update(tensors_digest(state.items()).encode())
    identity = digest.hexdigest()
    _cache[hf_model] = (stamp, identity)
    return identity


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """XXH3-128 over the names, shapes, dtypes and bytes of named tensors (in name order)."""
    digest = xxhash.xxh3_128()
    seen: dict[tuple, str] = {}
    for name, tensor in sorted(named, key=lambda item: item[0]):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if key in seen and tensor.numel():  # tied weights: one storage, hashed once, named twice
            digest.update(f"same as {seen[key]}".encode())
            continue
        seen[key] = name
        _update(digest, tensor)
    return digest.hexdigest()


def file_digest(path: Any) -> str:
    """XXH3-128 of a file's bytes, read in 64 MB pieces."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while piece := handle.read(_CHUNK):
            digest.update(piece)
    return digest.hexdigest()


def _update(digest: Any, tensor: torch.Tensor) -> None:
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return
    per_chunk = max(1, _CHUNK // flat.element_size())
    for start in range(0, flat.numel(), per_chunk):
        piece = flat[start : start + per_chunk].cpu().contiguous()
        # Viewed as bytes, so bf16 (which numpy lacks) hashes like any dtype, without a copy on the CPU.
        digest.update(piece.view(torch.uint8).numpy())


def _architecture(hf_model: Any) -> str:
    config = hf_model.config.to_dict() if hasattr(hf_model, "config") else {}
    kept = {key: value for key, value in config.items() if key not in _NOT_ARCHITECTURE}
    return type(hf_model).__name__ + json.dumps(kept, sort_keys=True, default=str)


def _stamp(state: dict[str, torch.Tensor]) -> tuple:
    sample = xxhash.xxh3_128()
    parts = []
    for name, tensor in state.items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        sample.update(flat[::step].cpu().contiguous().view(torch.uint8).numpy())
        version = getattr(tensor, "_version", 0)  # torch's in-place edit counter (shared with .detach())
        parts.append((name, tensor.data_ptr(), version, tuple(tensor.shape), str(tensor.dtype)))
    return (*parts, sample.hexdigest())
