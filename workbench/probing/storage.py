"""Where a harvest's files live: a local folder, or a folder at any fsspec URL (memory://, file://, s3://).

A harvest needs a handful of file operations: read and write the manifest, write a shard, check a shard's
size and checksum, read one tensor of a shard, list and remove the harvest's own files. `LocalFolder` does
them as the harvest always did (os.replace for atomic writes, links resolved to keep paths inside the
folder); `UrlFolder` does them through fsspec, so a Ray worker on another node writes its shards straight to
an object store. Every write goes to a temporary name and is then moved onto the final one: a rename on a
filesystem, a server-side copy of a whole object on an object store, where an object only ever appears
whole, so a reader never sees half a shard or half a manifest either way.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from workbench.identity import file_digest

__all__ = ["LocalFolder", "UrlFolder", "is_url", "open_folder"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(::|://)")
_CHUNK = 64 << 20
_MAX_HEADER = 100 << 20  # safetensors' own limit
# safetensors' dtype names (the ones a harvest can hold).
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def is_url(folder: Any) -> bool:
    """A string with a protocol (``memory://``, ``s3://``, ``simplecache::s3://``): an fsspec location. A
    ``Path`` is always local."""
    return isinstance(folder, str) and bool(_URL.match(folder))


def open_folder(folder: str | Path) -> LocalFolder | UrlFolder:
    if is_url(folder):
        return UrlFolder(folder)
    if not isinstance(folder, (str, Path)):
        raise TypeError(
            f"A harvest folder is a path or an fsspec URL (such as 's3://bucket/harvest'), not "
            f"{type(folder).__name__}."
        )
    return LocalFolder(Path(folder))


class LocalFolder:
    """A folder on this machine's filesystem."""

    def __init__(self, path: Path) -> None:
        self.location = path

    def __str__(self) -> str:
        return str(self.location)

    def where(self, name: str) -> str:
        return str(self.location / name)

    def exists(self) -> bool:
        return self.location.exists()

    def is_file_itself(self) -> bool:
        return self.location.exists() and not self.location.is_dir()

    def make(self) -> None:
        self.location.mkdir(parents=True, exist_ok=True)

    def has(self, name: str) -> bool:
        return (self.location / name).exists()

    def leads_outside(self, name: str) -> bool:
        path = self.location / name
        return path.is_symlink() or path.resolve().parent != self.location.resolve()

    def is_file(self, name: str) -> bool:
        return (self.location / name).is_file()

    def size(self, name: str) -> int:
        return (self.location / name).stat().st_size

    def digest(self, name: str) -> str:
        return file_digest(self.location / name)

    def read_text(self, name: str) -> str:
        return (self.location / name).read_text()

    def write_text(self, name: str, text: str) -> None:
        self._write_atomic(name, lambda tmp: Path(tmp).write_text(text))

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
        """Write a safetensors file atomically; its size and XXH3-128 checksum."""
        self._write_atomic(name, lambda tmp: save_file(tensors, tmp))
        return self.size(name), self.digest(name)

    def entries(self) -> list[tuple[str, bool]]:
        """Everything in the folder: (name, whether it is a plain file rather than a link or a folder)."""
        return [(p.name, p.is_file() and not p.is_symlink()) for p in sorted(self.location.iterdir())]

    def remove(self, name: str) -> None:
        (self.location / name).unlink()

    def shape(self, name: str, key: str) -> list[int] | None:
        with safe_open(self.location / name, framework="pt") as reader:
            if key not in reader.keys():  # noqa: SIM118 (safe_open has no __contains__)
                return None
            return list(reader.get_slice(key).get_shape())

    def tensor(self, name: str, key: str) -> torch.Tensor | None:
        with safe_open(self.location / name, framework="pt") as reader:
            if key not in reader.keys():  # noqa: SIM118
                return None
            return reader.get_tensor(key)

    def _write_atomic(self, name: str, write) -> None:
        path = self.location / name
        tmp = path.with_name(path.name + ".tmp")
        write(str(tmp))
        os.replace(tmp, path)


class UrlFolder:
    """A folder at an fsspec URL. Credentials and options come from fsspec's usual configuration (environment,
    ``fsspec.config``), as for any fsspec user; nothing is stored in the harvest."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.location = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.location)
        except (ImportError, ValueError) as error:  # an unknown protocol, or its package is not installed
            raise type(error)(
                f"Cannot open the harvest folder {url!r} through fsspec ({error}): install the filesystem's "
                "package (s3fs for s3://, gcsfs for gs://, adlfs for az://), or pass a local path."
            ) from error
        self.root = self.root.rstrip("/")
        # Another process (a worker, an earlier run) may have written here: do not trust a listing cache.
        self.fs.invalidate_cache(self.root)

    def __str__(self) -> str:
        return self.location

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def where(self, name: str) -> str:
        return f"{self.location}/{name}"

    def exists(self) -> bool:
        return self.fs.exists(self.root)

    def is_file_itself(self) -> bool:
        return self.fs.isfile(self.root)

    def make(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def has(self, name: str) -> bool:
        return self.fs.exists(self._path(name))

    def leads_outside(self, name: str) -> bool:
        # The name has no separator (the manifest's names are checked), so only a link can lead out:
        # filesystems that have links (file://) report them in info().
        path = self._path(name)
        return self.fs.exists(path) and bool(self.fs.info(path).get("islink"))

    def is_file(self, name: str) -> bool:
        return self.fs.isfile(self._path(name))

    def size(self, name: str) -> int:
        return int(self.fs.size(self._path(name)))

    def digest(self, name: str) -> str:
        digest = xxhash.xxh3_128()
        with self.fs.open(self._path(name), "rb") as handle:
            while piece := handle.read(_CHUNK):
                digest.update(piece)
        return digest.hexdigest()

    def read_text(self, name: str) -> str:
        return self.fs.cat_file(self._path(name)).decode()

    def write_text(self, name: str, text: str) -> None:
        tmp = self._path(name + ".tmp")
        self.fs.pipe_file(tmp, text.encode())
        self.fs.mv(tmp, self._path(name))

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
        """Write the shard to a local temporary file (memory stays one shard, whatever its size), checksum it
        there, upload it under a temporary name and move it onto the final one."""
        handle, local = tempfile.mkstemp(suffix=".safetensors", prefix="workbench-shard-")
        os.close(handle)
        try:
            save_file(tensors, local)
            size, digest = os.path.getsize(local), file_digest(local)
            tmp = self._path(name + ".tmp")
            self.fs.put_file(local, tmp)
            self.fs.mv(tmp, self._path(name))
        finally:
            os.unlink(local)  # our own temporary file
        return size, digest

    def entries(self) -> list[tuple[str, bool]]:
        self.fs.invalidate_cache(self.root)
        found = []
        for info in self.fs.ls(self.root, detail=True):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            found.append((name, info.get("type") == "file" and not info.get("islink")))
        return sorted(found)

    def remove(self, name: str) -> None:
        self.fs.rm_file(self._path(name))

    def shape(self, name: str, key: str) -> list[int] | None:
        with self.fs.open(self._path(name), "rb") as handle:
            entry = _safetensors_header(handle, self.where(name))[0].get(key)
        return None if entry is None else list(entry["shape"])

    def tensor(self, name: str, key: str) -> torch.Tensor | None:
        """One tensor of a safetensors file, reading only its bytes (a ranged read on an object store)."""
        with self.fs.open(self._path(name), "rb") as handle:
            header, start = _safetensors_header(handle, self.where(name))
            if key not in header:
                return None
            entry = header[key]
            dtype, shape = _DTYPES.get(entry["dtype"]), entry["shape"]
            begin, end = entry["data_offsets"]
            numel = 1
            for n in shape:
                numel *= n
            if dtype is None or end - begin != numel * torch.empty((), dtype=dtype).element_size():
                raise ValueError(
                    f"{self.where(name)} describes {key!r} as {entry['dtype']} {shape} in {end - begin} "
                    "bytes, which do not match: the file is damaged."
                )
            out = torch.empty(numel, dtype=dtype)
            view = memoryview(out.view(torch.uint8).numpy()) if numel else memoryview(b"")
            handle.seek(start + begin)
            filled = 0
            while filled < len(view):
                got = handle.readinto(view[filled:])
                if not got:
                    raise ValueError(f"{self.where(name)} ends inside {key!r}: the file is truncated.")
                filled += got
        return out.reshape(shape)


def _safetensors_header(handle, where: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file (8 bytes of little-endian length, then JSON) and the offset at
    which the tensors' bytes start."""
    raw = handle.read(8)
    if len(raw) != 8:
        raise ValueError(f"{where} is not a safetensors file (shorter than its header).")
    (length,) = struct.unpack("<Q", raw)
    if length > _MAX_HEADER:
        raise ValueError(f"{where} is not a safetensors file (a header of {length} bytes).")
    try:
        header = json.loads(handle.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{where} is not a safetensors file (its header is not valid JSON).")
    header.pop("__metadata__", None)
    return header, 8 + length
