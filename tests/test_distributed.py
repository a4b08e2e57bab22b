"""Dataset passes on a local Ray cluster (two CPU workers, started and stopped here) give the in-process
result bit for bit, also when a worker is killed mid-run."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

import workbench
from workbench.data.alignment import TokenLabelledDataset
from workbench.data.corpus import tagged_sentences
from workbench.executors import LocalExecutor, RayExecutor, load_spec, resolve
from workbench.probing import harvest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    # A loaded 2-core machine can take over a minute to start Ray's agents; the default wait is shorter.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "600000")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster on the loopback
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    except Exception as error:  # Ray's own start-up (its agents) timed out: say so instead of failing CI
        ray.shutdown()
        pytest.skip(f"the local Ray cluster did not start on this machine: {error}")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model():
    return workbench.load()


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
    remote = harvest(
        model, data, tmp_path / "ray", shard_sentences=8, progress=False, executor=RayExecutor(num_workers=2)
    )
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
