"""Harvest throughput in-process and on a local Ray cluster with 1 and 2 workers, in the same run.

    .venv/bin/python benchmarks/scale.py [--layers 4] [--d-model 256] [--sentences 256]

A random Apertus of the given shape with the real 131k BPE tokenizer is written to a temporary folder
(every worker loads its own replica from it) and a tagged dataset is harvested (every layer's residual
stream) three ways; tokens per second are reported as ratios to the in-process harvest. On one machine the
workers share its cores, so this measures the overhead of the distributed path and how it scales with free
cores, not a cluster's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import workbench
from workbench.checkpoint.synthetic import make_random_checkpoint
from workbench.data.alignment import TokenLabelledDataset
from workbench.data.corpus import tagged_sentences
from workbench.executors import RayExecutor
from workbench.probing import harvest


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--sentences", type=int, default=256)
    args = parser.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_agent_register_timeout_ms", "600000")
    torch.set_num_threads(1)  # as each Ray worker: the comparison is per core
    work = Path(tempfile.mkdtemp(prefix="wb-scale-"))
    folder = make_random_checkpoint(
        work / "model", layers=args.layers, d_model=args.d_model, heads=8, kv_heads=4, tokenizer="tekken"
    )
    model = workbench.load(folder)
    sentences = tagged_sentences(args.sentences, seed=1)
    data = TokenLabelledDataset.from_tagged(sentences, "pos").encode(model.tokenizer)
    n_tokens = sum(len(ids) for ids in data.input_ids)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = {}
    local = work / "local"
    rows["in-process"] = timed(lambda: harvest(model, data, local, shard_sentences=32, progress=False))
    for n in (1, 2):
        executor = RayExecutor(num_workers=n)
        seconds = timed(
            lambda ex=executor, n=n: harvest(
                model, data, work / f"ray{n}", shard_sentences=32, progress=False, executor=ex
            )
        )
        rows[f"ray, {n} worker(s)"] = seconds
    ray.shutdown()
    base = rows["in-process"]
    print(f"{n_tokens} tokens, {args.layers} layers, d_model {args.d_model}")
    print(f"{'run':<20} {'s':>8} {'tok/s':>10} {'vs in-process':>14}")
    for name, seconds in rows.items():
        print(f"{name:<20} {seconds:8.2f} {n_tokens / seconds:10.0f} {base / seconds:13.2f}x")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"tokens": n_tokens, "seconds": rows}, indent=2))


if __name__ == "__main__":
    main()
