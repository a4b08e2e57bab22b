"""Timing helpers for the benchmarks: interleaved rounds, ratios to a baseline measured in the same run."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def time_interleaved(
    variants: dict[str, Callable[[], object]], baseline: str, rounds: int = 11, warmup: int = 2
):
    """Run every variant once per round, in a rotating order, and return per-variant medians and the median of
    the per-round ratios to `baseline` (robust to the machine slowing down or speeding up between rounds)."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - start)
    rows = {}
    for name in names:
        ratios = [t / b for t, b in zip(seconds[name], seconds[baseline])]
        rows[name] = {"median_s": statistics.median(seconds[name]), "ratio": statistics.median(ratios)}
    return rows


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    return path
