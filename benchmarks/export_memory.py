"""Standalone probe export: the peak rise of resident memory in `export_probe(..., standalone=True)`.

A random Apertus (8 layers, d_model 768, d_mlp 3072, float32; ~0.3 GB) is saved once; each measurement runs
in a fresh process: load it, harvest a few tagged-grammar sentences, train the probes briefly, then export
the probe of the last layer (every layer kept), with the kernel's peak-RSS counter (VmHWM) reset just before
(glibc's mmap threshold fixed at 64 kB and the heap trimmed first: otherwise the export reuses memory freed
by loading and training, and its rise does not show).
Reported: (peak RSS during the export - RSS before it) / (bytes of the written model.safetensors). Target:
well under 1x (no second copy of the kept layers). With ``--compare PATH`` the same export is also run by the
checkout at PATH (e.g. /work/main) for the "before" figure.

    python benchmarks/export_memory.py [--compare /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

CHILD = """
import ctypes, json, sys, time, psutil, torch, workbench
from pathlib import Path
from workbench.data.alignment import TokenLabelledDataset
from workbench.data.corpus import tagged_sentences
from workbench.probing import export_probe, harvest, train_probes
work = Path(sys.argv[2])
model = workbench.load(sys.argv[1])
data = TokenLabelledDataset.from_tagged(tagged_sentences(40, seed=1), "pos")
hooks = [f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
probes = train_probes(harvest(model, data, work / "harvest", hooks=hooks, progress=False), max_steps=5,
                      progress=False)
def high_water():  # VmHWM: the peak RSS since the last reset, in bytes
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that reused memory shows as a rise
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the current RSS
before = psutil.Process().memory_info().rss
start = time.perf_counter()
folder = export_probe(probes, model.cfg.n_layers, work / "tagger", model, standalone=True)
seconds = time.perf_counter() - start
peak = [high_water()]
size = (folder / "model.safetensors").stat().st_size
print(json.dumps({"file_mb": size / 2**20, "extra_mb": (peak[0] - before) / 2**20,
                  "ratio": (peak[0] - before) / size, "seconds": seconds}))
"""


def measure(checkout: Path, model: Path, work: Path) -> dict:
    # A fixed mmap threshold: freed tensors go back to the system, so RSS counts what the export allocates.
    env = {
        **os.environ,
        "PYTHONPATH": str(checkout),
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), str(work)], env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    from probing import random_model

    workdir = Path(tempfile.mkdtemp(prefix="bench-export-memory-"))
    random_model(workdir / "model", layers=8, d_model=768, heads=12, kv_heads=4, d_mlp=3072)
    rows = []
    checkouts = [("this checkout", here)] + ([("compared", args.compare)] if args.compare else [])
    for r in range(args.rounds):
        for label, checkout in checkouts:
            row = {"code": label, **measure(checkout, workdir / "model", workdir / f"run-{r}-{len(rows)}")}
            rows.append(row)
            print(
                f"{label:14s} model.safetensors {row['file_mb']:7.1f} MB, "
                f"extra peak {row['extra_mb']:7.1f} MB = {row['ratio']:.2f}x, {row['seconds']:.1f} s"
            )
    shutil.rmtree(workdir)  # the temporary folder this run made
    path = write_json("export_memory", {"machine": machine(), "rows": rows})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
