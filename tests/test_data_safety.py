"""Fault injection: nothing a user wrote is deleted, no two models' activations mix, a damaged file is named.

Each test damages a harvest, an export or a checkpoint the way a crash, a shared disk or a stray edit would,
and checks that the workbench refuses with the file's name and the fix, and that the fix recovers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import workbench
from workbench.checkpoint import DEFAULT_CHECKPOINT
from workbench.identity import model_identity
from workbench.loading import MissingWeightsError
from workbench.probing import (
    CorruptHarvestError,
    Harvest,
    export_probe,
    harvest,
    load_probe_tagger,
    train_probes,
)
from workbench.probing import export as export_module

FAST = {"progress": False}
SETTINGS = {"shard_sentences": 6, **FAST}


@pytest.fixture
def made(model, data, tmp_path):
    """A finished harvest of three shards, and what it loads."""
    folder = tmp_path / "harvest"
    h = harvest(model, data, folder, **SETTINGS)
    assert len(h.manifest["shards"]) == 3
    return folder, h.load()


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ overwrite and paths
def test_a_user_file_beside_a_harvest_survives_overwrite(model, data, made):
    folder, _ = made
    (folder / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"files that no harvest wrote \(notes.txt\)"):
        harvest(model, data[:6], folder, overwrite=True, **SETTINGS)
    assert (folder / "notes.txt").read_text() == "my notes"
    assert Harvest.open(folder).complete  # the old harvest is untouched too
    (folder / "notes.txt").unlink()
    replaced = harvest(model, data[:6], folder, overwrite=True, **SETTINGS)
    assert replaced.n_tokens == data[:6].encode(model.tokenizer).n_labelled


def test_overwrite_never_empties_a_folder_that_holds_no_harvest(model, data, tmp_path):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "paper.tex").write_text("draft")
    (folder / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match="no harvest wrote"):
        harvest(model, data, folder, overwrite=True, **SETTINGS)
    assert (folder / "paper.tex").read_text() == "draft" and (folder / "sub" / "data.csv").exists()


@pytest.mark.parametrize("name", ["../victim.txt", "/ABSOLUTE", "sub/shard-00000.safetensors", "link"])
def test_manifest_paths_outside_the_folder_are_refused(model, data, made, name):
    folder, original = made
    victim = folder.parent / "victim.txt"
    victim.write_text("keep me")
    name = str(victim) if name == "/ABSOLUTE" else name
    if name == "link":  # a shard name that is a link to a file outside
        (folder / "shard-00000.safetensors").unlink()
        (folder / "shard-00000.safetensors").symlink_to(victim)
        name = "shard-00000.safetensors"
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["file"] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(CorruptHarvestError, match="corrupt"):
        Harvest.open(folder).load()
    with pytest.raises((CorruptHarvestError, FileExistsError)):
        harvest(model, data, folder, **SETTINGS)
    assert victim.read_text() == "keep me"
    if name == "shard-00000.safetensors":  # the link itself is not a harvest file: overwrite refuses
        with pytest.raises(FileExistsError, match="no harvest wrote"):
            harvest(model, data, folder, overwrite=True, **SETTINGS)
        (folder / name).unlink()
    recovered = harvest(model, data, folder, overwrite=True, **SETTINGS)
    assert victim.read_text() == "keep me"
    assert_same(recovered.load(), original)


# ------------------------------------------------------------------------------------ model identity
def test_a_resume_with_a_changed_model_is_refused(data, tmp_path):
    model = workbench.load()  # its own copy: a weight is changed below
    folder = tmp_path / "h"
    harvest(model, data, folder, **SETTINGS)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:1], False  # interrupted after one shard
    (folder / "manifest.json").write_text(json.dumps(manifest))

    weight = model.hf_model.model.layers[1].self_attn.o_proj.weight
    with torch.no_grad():
        weight.neg_()  # one attention weight negated
    with pytest.raises(FileExistsError, match="another model"):
        harvest(model, data, folder, **SETTINGS)
    with torch.no_grad():
        weight.neg_()
    resumed = harvest(model, data, folder, **SETTINGS)  # the same model again: it resumes
    assert resumed.complete


def test_export_refuses_a_model_the_probe_was_not_trained_on(data, tmp_path):
    model = workbench.load()
    h = harvest(model, data, tmp_path / "h", **SETTINGS)
    probes = train_probes(h, max_steps=5, **FAST)
    assert probes.model_identity == model_identity(model) == h.model_identity
    with torch.no_grad():
        model.hf_model.model.layers[0].self_attn.q_proj.weight[3, 5] += 1.0  # one element
    with pytest.raises(ValueError, match="another model"):
        export_probe(probes, 1, tmp_path / "tagger", model)
    assert not (tmp_path / "tagger").exists()


def test_identity_sees_every_weight_and_is_cached():
    model = workbench.load()
    first = model_identity(model)
    assert model_identity(model) == first
    weight = model.hf_model.model.layers[2].mlp.down_proj.weight
    weight.data[7, 11] += 0.5  # through .data (no version bump), outside the sample: a full rehash sees it
    assert model_identity(model, refresh=True) != first
    weight.data[7, 11] -= 0.5
    assert model_identity(model, refresh=True) == first
    weight.data.neg_()  # a whole matrix through .data: the cache's sample sees it
    assert model_identity(model) != first
    weight.data.neg_()
    assert model_identity(model) == first
    half = workbench.load(dtype=torch.bfloat16)
    assert model_identity(half) != first  # another dtype, another model


# ------------------------------------------------------------------------------------ damaged shards
def damage(folder: Path, how: str) -> None:
    shard, other = folder / "shard-00001.safetensors", folder / "shard-00002.safetensors"
    if how == "deleted":
        shard.unlink()
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "swapped":
        a, b = shard.read_bytes(), other.read_bytes()
        shard.write_bytes(b)
        other.write_bytes(a)
    elif how == "edited":  # same size, one float changed
        tensors = load_file(shard)
        tensors["blocks.0.hook_resid_pre"][0, 0] += 1.0
        save_file(tensors, shard)
    elif how == "manifest-truncated":
        text = (folder / "manifest.json").read_text()
        (folder / "manifest.json").write_text(text[: len(text) // 2])


@pytest.mark.parametrize("how", ["deleted", "truncated", "swapped", "edited", "manifest-truncated"])
def test_a_damaged_shard_is_named_and_overwrite_recovers(model, data, made, how):
    folder, original = made
    damage(folder, how)
    named = "manifest.json" if how == "manifest-truncated" else "shard-00001.safetensors"
    with pytest.raises(CorruptHarvestError, match=rf"{named}[\s\S]*overwrite=True"):
        Harvest.open(folder).load()
    with pytest.raises(CorruptHarvestError, match=rf"{named}[\s\S]*overwrite=True"):
        harvest(model, data, folder, **SETTINGS)  # a resume checks every finished shard
    if how != "manifest-truncated":
        with pytest.raises(CorruptHarvestError, match=named):
            train_probes(folder, **FAST)
    recovered = harvest(model, data, folder, overwrite=True, **SETTINGS)
    assert_same(recovered.load(), original)


def test_a_shard_with_other_row_counts_is_named(model, data, made):
    folder, _ = made
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][2]["tokens"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptHarvestError, match=r"shard-00002.safetensors[\s\S]*rows"):
        Harvest.open(folder).load()


# ------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def probes(model, data, tmp_path_factory):
    h = harvest(model, data, tmp_path_factory.mktemp("exp") / "h", **SETTINGS)
    return train_probes(h, max_steps=20, **FAST)


@pytest.mark.parametrize("standalone", [False, True])
def test_an_export_whose_final_move_fails_leaves_the_previous_checkpoint(
    model, probes, tmp_path, monkeypatch, standalone
):
    target = tmp_path / "tagger"
    export_probe(probes, 1, target, model, standalone=standalone)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_replace = os.replace

    def failing(src, dst):
        if Path(src).name.startswith(".tagger.tmp"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(export_module.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        export_probe(probes, 2, target, model, standalone=standalone, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tagger"]  # no temporary or set-aside folder left
    assert load_probe_tagger(target).config.num_hidden_layers == 1
    export_probe(
        probes, 2, target, model, standalone=standalone, overwrite=True
    )  # a working move replaces it
    assert load_probe_tagger(target).config.num_hidden_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tagger"]


def test_an_export_never_deletes_files_it_did_not_write(model, probes, tmp_path):
    target = tmp_path / "tagger"
    export_probe(probes, 1, target, model)
    (target / "README.md").write_text("my notes about this probe")
    with pytest.raises(FileExistsError, match=r"no probe export wrote \(README.md\)"):
        export_probe(probes, 2, target, model, overwrite=True)
    assert (target / "README.md").exists() and load_probe_tagger(target).config.num_hidden_layers == 1
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError, match="no probe export wrote"):
        export_probe(probes, 1, tmp_path / "work", model, overwrite=True)
    assert (tmp_path / "work" / "thesis.tex").exists()


def test_a_small_export_refuses_a_base_whose_weights_changed(model, probes, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(DEFAULT_CHECKPOINT, base)
    export_probe(probes, 2, tmp_path / "tagger", model, base=base)
    tensors = load_file(base / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"].neg_()
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not hold the weights this probe was trained on"):
        load_probe_tagger(tmp_path / "tagger")
    assert load_probe_tagger(tmp_path / "tagger", base=DEFAULT_CHECKPOINT).config.num_hidden_layers == 2


# ------------------------------------------------------------------------------------ checkpoints
def test_a_checkpoint_with_a_missing_layer_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(DEFAULT_CHECKPOINT, folder)
    tensors = load_file(folder / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if not k.startswith("model.layers.1.")}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MissingWeightsError, match=r"layer\(s\) 1 are missing[\s\S]*allow_missing_weights"):
        workbench.load(folder)
    assert workbench.load(folder, allow_missing_weights=True).cfg.n_layers == 3


def test_a_config_with_more_layers_than_the_weights_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(DEFAULT_CHECKPOINT, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MissingWeightsError, match=r"layer\(s\) 3, 4 are missing"):
        workbench.load(folder)
