"""Harvest throughput in-process and on a local Ray cluster with 1 and 2 workers, in the same run.

    .venv/bin/python benchmarks/scale.py [--layers 4] [--d-model 256] [--sentences 256] [--rounds 1]

A random Apertus of the given shape with the real 131k BPE tokenizer is written to a temporary folder
(every worker loads its own replica from it) and a tagged dataset is harvested (every layer's residual
stream) three ways; tokens per second are reported as ratios to the in-process harvest. On one machine the
workers share its cores, so this measures the overhead of the distributed path and how it scales with free
cores, not a cluster's speed. With --rounds > 1 the three are interleaved and medians reported. Ray's own
start-up can time out on a loaded machine (its 30 s wait is fixed): it is retried --tries times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def start_ray(ray, tries: int) -> int:
    """Start a local two-CPU cluster; the attempt that worked."""
    for attempt in range(1, tries + 1):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            return attempt
        except Exception as error:  # Ray's start-up timed out (a loaded machine): try again
            print(f"ray.init attempt {attempt} of {tries} failed: {str(error).splitlines()[0]}")
            ray.shutdown()
            time.sleep(10)
    raise SystemExit(f"Ray did not start in {tries} attempts on this machine (load {os.getloadavg()}).")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tries", type=int, default=3)
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
    load_before = os.getloadavg()
    attempt = start_ray(ray, args.tries)
    times: dict[str, list[float]] = {"in-process": [], "ray, 1 worker(s)": [], "ray, 2 worker(s)": []}
    for r in range(args.rounds):
        local = work / f"local-{r}"
        times["in-process"].append(
            timed(lambda f=local: harvest(model, data, f, shard_sentences=32, progress=False))
        )
        for n in (1, 2):
            executor = RayExecutor(num_workers=n)
            seconds = timed(
                lambda ex=executor, f=work / f"ray{n}-{r}": harvest(
                    model, data, f, shard_sentences=32, progress=False, executor=ex
                )
            )
            times[f"ray, {n} worker(s)"].append(seconds)
    ray.shutdown()
    rows = {name: statistics.median(values) for name, values in times.items()}
    base = rows["in-process"]
    conditions = {
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "ray_init_attempt": attempt,
        "rounds": args.rounds,
    }
    print(json.dumps(conditions))
    print(f"{n_tokens} tokens, {args.layers} layers, d_model {args.d_model}")
    print(f"{'run':<20} {'s':>8} {'tok/s':>10} {'vs in-process':>14}")
    for name, seconds in rows.items():
        print(f"{name:<20} {seconds:8.2f} {n_tokens / seconds:10.0f} {base / seconds:13.2f}x")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    result = {"tokens": n_tokens, "seconds": rows, "all_seconds": times, **conditions}
    (out / "scale.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
