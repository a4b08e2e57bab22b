"""Probing memory: the peak resident memory of `train_probes` against the harvested feature size.

A random Apertus (8 layers, d_model 512) harvests the residual stream after every layer (9 hooks, float32) of
tagged-grammar sentences; then each measurement runs `train_probes` (full-batch and mini-batch) in a fresh
process and reports (peak RSS - RSS before the call) / (bytes of the harvested features). Target: <= 1.2x.
With ``--compare PATH`` the same harvest is also trained by the checkout at PATH (e.g. /work/main) for the
"before" figure.

    python benchmarks/probing_memory.py [--sentences 3000 --compare /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

CHILD = """
import json, resource, sys, psutil, torch
from workbench.probing import Harvest, train_probes
h = Harvest.open(sys.argv[1])
features = h.n_tokens * sum(h.manifest["model"]["d_model"] for _ in h.hooks) * 4
before = psutil.Process().memory_info().rss
train_probes(h, max_steps=30, batch_size=None if sys.argv[2] == "None" else int(sys.argv[2]), progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"features_mb": features / 2**20, "extra_mb": (peak - before) / 2**20,
                  "ratio": (peak - before) / features}))
"""


def measure(checkout: Path, folder: Path, batch_size: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), batch_size], env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=3000)
    parser.add_argument("--compare", type=Path, default=None)
    args = parser.parse_args()
    torch_threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    from workbench.data.alignment import TokenLabelledDataset
    from workbench.data.corpus import tagged_sentences
    from workbench.probing import harvest

    here = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(here / "benchmarks"))
    from probing import random_model

    workdir = Path(tempfile.mkdtemp(prefix="bench-probing-memory-"))
    model = random_model(workdir / "model", layers=8, d_model=512, heads=8, kv_heads=2, d_mlp=1536)
    data = TokenLabelledDataset.from_tagged(tagged_sentences(args.sentences, seed=1), "pos")
    folder = workdir / "harvest"
    harvest(model, data, folder, shard_sentences=500, progress=False)
    rows = []
    checkouts = [("this checkout", here)] + ([("compared", args.compare)] if args.compare else [])
    for label, checkout in checkouts:
        for batch in ("None", "4096"):
            row = {"code": label, "batch_size": batch, **measure(checkout, folder, batch)}
            rows.append(row)
            print(
                f"{label:14s} batch_size={batch:5s} features {row['features_mb']:7.1f} MB, "
                f"extra peak {row['extra_mb']:7.1f} MB = {row['ratio']:.2f}x"
            )
    path = write_json(
        "probing_memory",
        {"machine": machine(), "threads": torch_threads, "sentences": args.sentences, "rows": rows},
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
