"""Dataset passes on a local Ray cluster (two CPU workers, started and stopped here) give the in-process
result bit for bit, also when a worker is killed mid-run."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch

from workbench.data.alignment import TokenLabelledDataset
from workbench.data.corpus import ioi_prompts, tagged_sentences
from workbench.executors import LocalExecutor, RayExecutor, load_spec, resolve
from workbench.probing import harvest
from workbench.xielu import xielu_statistics

ray = pytest.importorskip("ray")
# `make test` runs these in a pytest of their own after the parallel run: Ray's start-up (a fixed 30 s
# wait for its raylet) fails on a 2-core machine whose cores another test worker keeps busy.
pytestmark = pytest.mark.ray


# Session-scoped: started once however pytest orders the tests (a second start in one process is slow and
# often times out). Ray's own wait for its raylet is a fixed 30 s (ray/_private/node.py): no setting.
@pytest.fixture(scope="session")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster on the loopback
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    except Exception as error:  # Ray's own start-up (its agents) timed out: say so instead of failing CI
        ray.shutdown()
        pytest.skip(f"the local Ray cluster did not start on this machine: {error}")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(model):
    return TokenLabelledDataset.from_tagged(tagged_sentences(48, seed=5), "pos").encode(model.tokenizer)


def single_threaded(fn):
    # Workers run one thread each; the reference must use the same kernels to be comparable bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def digests(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return [(s["index"], s["tokens"], s["xxh3_128"]) for s in manifest["shards"]], manifest


def test_a_distributed_harvest_equals_the_in_process_one(cluster, model, data, tmp_path):
    local = single_threaded(
        lambda: harvest(model, data, tmp_path / "local", shard_sentences=8, progress=False)
    )
    # The workers get the folder as an fsspec URL (what s3:// or gs:// would be on a cluster); the
    # killed-worker test below harvests into a plain path.
    url = f"file://{tmp_path / 'ray'}"
    remote = harvest(model, data, url, shard_sentences=8, progress=False, executor=RayExecutor(num_workers=2))
    assert remote.folder == url
    ours, manifest = digests(tmp_path / "ray")
    assert ours == digests(tmp_path / "local")[0] and len(ours) == 6
    assert all(":" in shard["worker"] for shard in manifest["shards"])  # host:pid of the worker
    assert len({shard["worker"] for shard in manifest["shards"]}) == 2
    for key, tensor in local.load().items():
        assert torch.equal(tensor, remote.load()[key])


def test_a_killed_worker_is_restarted_and_its_shard_rerun(cluster, model, data, tmp_path):
    reference = single_threaded(
        lambda: harvest(model, data, tmp_path / "local", shard_sentences=4, progress=False)
    )
    executor = RayExecutor(num_workers=2, max_retries=2)
    killed = []

    def kill_after_first_shard():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if list((tmp_path / "ray").glob("shard-*.safetensors")) and executor.workers:
                ray.kill(executor.workers[0], no_restart=False)
                killed.append(time.time())
            time.sleep(0.05)

    thread = threading.Thread(target=kill_after_first_shard)
    thread.start()
    result = harvest(model, data, tmp_path / "ray", shard_sentences=4, progress=False, executor=executor)
    thread.join()
    assert killed, "the test never killed a worker"
    ours, manifest = digests(tmp_path / "ray")
    assert manifest["complete"] and ours == digests(tmp_path / "local")[0]
    for key, tensor in reference.load().items():
        assert torch.equal(tensor, result.load()[key])


def test_executors_are_checked(model):
    assert isinstance(resolve(None), LocalExecutor)
    with pytest.raises(TypeError, match="RayExecutor"):
        resolve("ray")
    with pytest.raises(ValueError, match="positive integer"):
        RayExecutor(num_workers=0)
    assert load_spec(model)["source"].endswith("apertus-tiny")
    with pytest.raises(ValueError, match="not made by workbench.load"):
        load_spec(object())


# ------------------------------------------------------------------------------------ xIELU statistics
PROMPTS = [p.clean for p in ioi_prompts(24, seed=3)]  # distinct prompts: no ties among top-k


def stats_equal(a, b):
    for name in ("hist", "outside", "counts", "post_abs", "output_norm", "top_values", "top_where"):
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name
    assert (a.n_tokens, a.n_prompts) == (b.n_tokens, b.n_prompts)


def test_merged_shards_equal_one_pass(model):
    whole = xielu_statistics(model, PROMPTS, batch_size=4, progress=False)
    sharded = xielu_statistics(model, PROMPTS, batch_size=4, shard_prompts=8, progress=False)
    for name in ("hist", "outside", "counts"):  # counts add exactly, whatever the order
        assert np.array_equal(getattr(sharded, name), getattr(whole, name)), name
    np.testing.assert_allclose(sharded.post_abs, whole.post_abs, rtol=1e-9)
    np.testing.assert_allclose(sharded.output_norm, whole.output_norm, rtol=1e-9)
    np.testing.assert_array_equal(sharded.top_values, whole.top_values)
    np.testing.assert_array_equal(sharded.bottom_values, whole.bottom_values)
    # Prompt indices continue from shard to shard. Equal values (the same token at the same place in two
    # prompts) may come from either prompt, so compare where each value is unique in its list.
    values = whole.bottom_values
    unique = (values[..., :, None] == values[..., None, :]).sum(-1) == 1
    unique &= values != values[..., -1:]
    np.testing.assert_array_equal(sharded.bottom_where[unique], whole.bottom_where[unique])
    assert unique.sum() > values.size // 2 and sharded.bottom_where[..., 0].max() >= 16
    assert sharded.n_prompts == len(PROMPTS)


def test_distributed_statistics_equal_the_in_process_ones_after_a_kill(cluster, model):
    local = single_threaded(
        lambda: xielu_statistics(model, PROMPTS, batch_size=4, shard_prompts=4, progress=False)
    )
    # One Ray run, killed mid-way: its result equal to the in-process one shows both that the distributed pass
    # is exact and that a restarted worker's shard is rerun (an unkilled run would start two more actors).
    executor = RayExecutor(num_workers=2, max_retries=2)
    killed = []

    def kill_soon():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if executor.workers:
                time.sleep(1.0)
                ray.kill(executor.workers[-1], no_restart=False)
                killed.append(True)
            time.sleep(0.05)

    thread = threading.Thread(target=kill_soon)
    thread.start()
    survived = xielu_statistics(
        model, PROMPTS, batch_size=4, shard_prompts=4, progress=False, executor=executor
    )
    thread.join()
    assert killed
    stats_equal(survived, local)
