"""Where a dataset pass runs: in this process (the default), or on a Ray cluster with one model per worker.

A dataset pass (`harvest`, `xielu_statistics`) cuts its work into shards and hands the executor a job: a
module-level function `job(model, shard, progress)` that returns a small, JSON-able or tensor result.
`LocalExecutor` runs the shards in order with the caller's model. `RayExecutor` starts one actor per worker,
each loading its own replica of the model from the same checkpoint (`model.load_spec`, what `load()` was
given) and checking that the replica's weights hash to the caller's model identity, then runs the shards on
whichever worker is free; a worker that dies is restarted and its shard run again. Results come back with
their shard, and the pass merges them in shard order, so the answer does not depend on which worker did what.

Ray is an optional extra (`pip install apertus-workbench[ray]`); nothing here imports it until a
`RayExecutor` is used.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from workbench.identity import model_identity


class LocalExecutor:
    """Runs every shard in this process, in order, with the caller's model."""

    def map(
        self, model: Any, job: Callable, shards: Iterable[Any], progress: Callable | None = None
    ) -> Iterator:
        for shard in shards:
            yield shard, job(model, shard, progress), "local"

    def __repr__(self) -> str:
        return "LocalExecutor()"


class RayExecutor:
    """Runs shards on `num_workers` Ray actors, each holding one replica of the model.

    address: a running cluster's address (None starts or joins a local one, as `ray.init()` does).
    num_gpus / num_cpus: resources per worker (one GPU each on a GPU cluster: `num_gpus=1`).
    load_kwargs: overrides for the replicas' `workbench.load(...)` (e.g. {"device": "cuda"}).
    max_retries: how often a dead worker is restarted and its shard rerun.
    """

    def __init__(
        self,
        num_workers: int = 2,
        *,
        address: str | None = None,
        num_gpus: float = 0,
        num_cpus: float = 1,
        load_kwargs: dict | None = None,
        max_retries: int = 3,
    ) -> None:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive integer, not {num_workers!r}.")
        self.num_workers, self.address = num_workers, address
        self.num_gpus, self.num_cpus = num_gpus, num_cpus
        self.load_kwargs, self.max_retries = dict(load_kwargs or {}), max_retries
        self.workers: list[Any] = []

    def map(
        self, model: Any, job: Callable, shards: Iterable[Any], progress: Callable | None = None
    ) -> Iterator:
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False)
        spec = {**load_spec(model), **self.load_kwargs}
        identity = model_identity(model)
        worker_class = ray.remote(ModelWorker).options(
            num_gpus=self.num_gpus,
            num_cpus=self.num_cpus,
            max_restarts=self.max_retries,
            max_task_retries=self.max_retries,
        )
        self.workers = [worker_class.remote(spec, identity) for _ in range(self.num_workers)]
        try:
            pending = {}
            queue = list(shards)
            free = list(self.workers)
            while queue or pending:
                while queue and free:
                    worker, shard = free.pop(), queue.pop(0)
                    pending[worker.run.remote(job, shard)] = (worker, shard)
                done, _ = ray.wait(list(pending), num_returns=1)
                worker, shard = pending.pop(done[0])
                result, where = ray.get(done[0])
                free.append(worker)
                yield shard, result, where
        finally:
            for worker in self.workers:
                ray.kill(worker)
            self.workers = []

    def __repr__(self) -> str:
        return f"RayExecutor({self.num_workers} workers, {self.num_gpus} GPUs and {self.num_cpus} CPUs each)"


class ModelWorker:
    """A Ray actor's body: loads one replica of the model and runs jobs on it."""

    def __init__(self, spec: dict, identity: str) -> None:
        import torch

        import workbench

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        spec = dict(spec)
        self.model = workbench.load(spec.pop("source"), **spec)
        mine = model_identity(self.model)
        if mine != identity:
            raise RuntimeError(
                f"This worker's replica of {spec} has identity {mine}, not the caller's {identity}: the "
                "checkpoint differs on this node (or the caller's model was edited after loading). Give "
                "every worker the same checkpoint, or run in-process."
            )
        self.where = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, job: Callable, shard: Any) -> tuple[Any, str]:
        return job(self.model, shard, None), self.where


def load_spec(model: Any) -> dict:
    """How to load `model` again (`load()` records it): what a remote worker needs to build a replica."""
    spec = getattr(model, "load_spec", None)
    if not spec:
        raise ValueError(
            "This model was not made by workbench.load(), so a worker cannot load a replica of it: load it "
            "with workbench.load(folder, ...) (a folder every worker can read), or run in-process."
        )
    return dict(spec)


def resolve(executor: Any) -> Any:
    """The executor to use: the in-process one by default."""
    if executor is None:
        return LocalExecutor()
    if not callable(getattr(executor, "map", None)):
        raise TypeError(
            "executor must be a LocalExecutor or a RayExecutor (an object with .map), "
            f"not {type(executor).__name__}."
        )
    return executor


def _ray():
    try:
        import ray
    except ImportError as error:
        raise ImportError(
            "RayExecutor needs Ray: pip install 'apertus-workbench[ray]' (or pip install 'ray[default]')."
        ) from error
    return ray
