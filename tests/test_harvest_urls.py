"""A harvest folder given as an fsspec URL (here fsspec's in-memory filesystem, memory://) is the local
byte for byte, with the same guarantees: it resumes, refuses to delete what it did not write, names a damaged
shard, keeps manifest paths inside the folder, and feeds probes and sparse-autoencoder training."""

from __future__ import annotations

import json
import uuid

import fsspec
import pytest
import torch

from workbench.probing import CorruptHarvestError, Harvest, harvest, train_probes
from workbench.probing.storage import is_url
from workbench.sae import HarvestSource

SETTINGS = {"shard_sentences": 6, "progress": False}
memory = fsspec.filesystem("memory")


@pytest.fixture(scope="module")
def local(model, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("local") / "h"
    return harvest(model, data, folder, **SETTINGS)


def fresh_root() -> str:
    return f"/wb-test-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def remote(model, data):
    root = fresh_root()
    yield harvest(model, data, f"memory://{root}/h", **SETTINGS)
    memory.rm(root, recursive=True)  # the test's own in-memory folder


@pytest.fixture
def url(remote):
    """A copy of the module's memory:// harvest, for a test to damage."""
    root = fresh_root()
    memory.copy(str(remote.folder).removeprefix("memory://"), f"{root}/h", recursive=True)
    yield f"memory://{root}/h"
    memory.rm(root, recursive=True)


def records(h: Harvest) -> list[tuple]:
    return [(s["index"], s["file"], s["tokens"], s["bytes"], s["xxh3_128"]) for s in h.manifest["shards"]]


def shard_bytes(url: str, name: str) -> bytes:
    return memory.cat_file(f"{url}/{name}")


def test_a_url_harvest_equals_the_local_one(model, data, local, remote):
    url = remote.folder
    assert is_url(remote.folder) and remote.complete
    assert records(remote) == records(local) and len(records(local)) == 3
    assert memory.ls(url.removeprefix("memory://"), detail=False) == [
        f"{url.removeprefix('memory://')}/{name}"
        for name in (
            "manifest.json",
            "shard-00000.safetensors",
            "shard-00001.safetensors",
            "shard-00002.safetensors",
        )
    ]  # no temporary object left behind
    expected = local.load()
    loaded = Harvest.open(url).load()
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert tensor.dtype == loaded[key].dtype and torch.equal(tensor, loaded[key]), key
    tokens = local.manifest["shards"][1]["tokens"]
    assert Harvest.open(url).shard_shape(1, "labels") == [tokens]
    assert Harvest.open(url).shard_shape(1, local.hooks[0]) == [tokens, model.cfg.d_model]
    assert harvest(model, data, url, **SETTINGS).manifest == remote.manifest  # finished: returned as it is


def test_a_url_harvest_resumes(model, data, local, url):
    manifest = json.loads(shard_bytes(url, "manifest.json"))
    manifest["shards"], manifest["complete"] = manifest["shards"][:1], False  # interrupted after one shard
    memory.pipe_file(f"{url}/manifest.json", json.dumps(manifest).encode())
    memory.rm_file(f"{url}/shard-00002.safetensors")
    first = memory.info(f"{url}/shard-00000.safetensors")["created"]
    with pytest.raises(RuntimeError, match="incomplete"):
        Harvest.open(url).load()
    resumed = harvest(model, data, url, **SETTINGS)
    assert memory.info(f"{url}/shard-00000.safetensors")["created"] == first  # kept, not recomputed
    assert resumed.complete and records(resumed) == records(local)


def test_overwrite_never_deletes_what_the_harvest_did_not_write(model, data, url):
    memory.pipe_file(f"{url}/notes.txt", b"mine")
    memory.pipe_file(f"{url}/sub/data.csv", b"also mine")
    with pytest.raises(FileExistsError, match=r"files that no harvest wrote \(notes.txt, sub\)"):
        harvest(model, data[:6], url, overwrite=True, **SETTINGS)
    assert shard_bytes(url, "notes.txt") == b"mine" and shard_bytes(url, "sub/data.csv") == b"also mine"
    assert Harvest.open(url).complete  # the old harvest is untouched too
    memory.rm_file(f"{url}/notes.txt")
    memory.rm(f"{url}/sub", recursive=True)
    replaced = harvest(model, data[:6], url, overwrite=True, **SETTINGS)
    assert replaced.manifest["n_sentences"] == 6 and len(replaced.manifest["shards"]) == 1
    assert memory.ls(url.removeprefix("memory://"), detail=False)[-1].endswith("shard-00000.safetensors")


def test_a_damaged_shard_in_a_url_harvest_is_named(model, data, local, url):
    original = shard_bytes(url, "shard-00001.safetensors")
    damaged = bytearray(original)
    damaged[-3] ^= 0x40  # one bit of one feature value: same size, another checksum
    memory.pipe_file(f"{url}/shard-00001.safetensors", bytes(damaged))
    named = r"shard-00001.safetensors[\s\S]*checksum[\s\S]*overwrite=True"
    with pytest.raises(CorruptHarvestError, match=named):
        Harvest.open(url).load()
    with pytest.raises(CorruptHarvestError, match=named):
        harvest(model, data, url, **SETTINGS)  # a resume checks every finished shard
    memory.pipe_file(f"{url}/shard-00001.safetensors", original)
    memory.pipe_file(f"{url}/shard-00002.safetensors", shard_bytes(url, "shard-00002.safetensors")[:-10])
    with pytest.raises(CorruptHarvestError, match=r"shard-00002.safetensors[\s\S]*truncated"):
        Harvest.open(url).load()
    recovered = harvest(model, data, url, overwrite=True, **SETTINGS)
    assert records(recovered) == records(local)


@pytest.mark.parametrize("name", ["../victim.txt", "sub/shard-00000.safetensors", "/wb-victim"])
def test_manifest_names_outside_a_url_folder_are_refused(url, name):
    manifest = json.loads(shard_bytes(url, "manifest.json"))
    manifest["shards"][0]["file"] = name
    memory.pipe_file(f"{url}/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(CorruptHarvestError, match="not a shard file of that folder"):
        Harvest.open(url)


def test_a_link_out_of_a_file_url_folder_is_refused(model, data, tmp_path):
    folder = tmp_path / "h"
    harvest(model, data[:6], f"file://{folder}", **SETTINGS)
    victim = tmp_path / "victim.safetensors"
    (folder / "shard-00000.safetensors").rename(victim)
    (folder / "shard-00000.safetensors").symlink_to(victim)
    with pytest.raises(CorruptHarvestError, match="leads outside"):
        Harvest.open(f"file://{folder}").load()
    with pytest.raises(FileExistsError, match=r"no harvest wrote \(shard-00000.safetensors\)"):
        harvest(model, data[:6], f"file://{folder}", overwrite=True, **SETTINGS)
    assert victim.exists()


def test_probes_and_sae_sources_read_a_url_harvest(model, local, remote):
    settings = {"max_steps": 5, "progress": False}
    here, there = train_probes(local, **settings), train_probes(remote.folder, **settings)
    assert torch.equal(here.weight, there.weight) and here.table.equals(there.table)
    hook = local.hooks[-1]
    source, reference = HarvestSource(remote, hook), HarvestSource(local, hook)
    assert source.width == reference.width == model.cfg.d_model and source.sizes == reference.sizes
    for shard in range(len(source.sizes)):
        assert torch.equal(source.read(shard), reference.read(shard))


def test_an_unknown_protocol_is_named_with_the_fix(model, data):
    with pytest.raises(ValueError, match=r"'nosuchfs://x/h'[\s\S]*install the filesystem's package"):
        harvest(model, data, "nosuchfs://x/h", **SETTINGS)
    with pytest.raises(ValueError, match="nosuchfs"):
        Harvest.open("nosuchfs://x/h")
