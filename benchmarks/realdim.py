"""Every analysis at Apertus-8B widths: time and peak memory per tool, per layer and per token.

A random checkpoint with Apertus-8B's shape (d_model 4096, 32 heads over 8 KV heads of 128, d_mlp 21504,
vocabulary 131072, bf16) but 2 layers, with the 131k tekken byte-level BPE tokenizer, is built once under
/tmp/realdim-tekken (reused when present). Each tool runs in each of two processes that load the checkpoint
with 1 and with 2 layers (`num_hidden_layers`), so that

    per layer = figure(2 layers) - figure(1 layer)      32-layer estimate = figure(2) + 30 x per layer

and the plain transformers forward over the same tokens is measured the same way, for comparison. Memory is
the peak rise of the process's resident memory (sampled every 2 ms by a thread) over its value just before
the call (after loading, a warm-up forward, and handing freed memory back to the system); time is one call
(these calls take seconds to minutes on a CPU).

    python benchmarks/realdim.py                      # the issue's sizes: 16 x 256 tokens, a 512-token lens
    python benchmarks/realdim.py --batch 2 --pos 128 --lens-pos 128 --neurons 32   # a small CPU
    python benchmarks/realdim.py --layer-counts 2 --tools forward_prompt,logit_lens   # 2 layers only: no
                                                                    # per-layer figures, half the time
    python benchmarks/realdim.py --dtype float32      # a CPU without bf16 matmuls (AVX512-BF16 or AMX): bf16
                                                      # is emulated there, 20-100x slower than float32
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_json  # noqa: E402

FOLDER = Path("/tmp/realdim-tekken")
SHAPE = {"d_model": 4096, "heads": 32, "kv_heads": 8, "d_head": 128, "d_mlp": 21504, "vocab": 131072}
LAYERS = 2
GB = 2**30

# tool: (what it does, the plain forward it is compared with, what its "per token" counts)
TOOLS = {
    "forward": ("transformers forward over the statistics batch", None, "batch tokens"),
    "xielu_statistics": ("xielu_statistics, every layer", "forward", "batch tokens"),
    "neuron_view": ("neuron_output_tokens (unembedding in chunks)", None, "call"),
    "forward_prompt": ("transformers forward over the prompt", None, "prompt tokens"),
    "logit_lens": ("logit_lens_table, top 5 at every layer and position", "forward_prompt", "prompt tokens"),
    "trajectory": ("target_trajectory at the last position", "forward_prompt", "prompt tokens"),
    "dla": ("direct_logit_attribution at the last position", "forward_prompt", "prompt tokens"),
    "decomposition": ("residual_decomposition, every position", "forward_prompt", "prompt tokens"),
    "neuron_patching": ("neurons of layer 0 patched at the last position", "forward_prompt", "neuron"),
}


def build(folder: Path = FOLDER) -> Path:
    """The random bf16 checkpoint at Apertus-8B widths with the tekken tokenizer (built once: 2.9 GB)."""
    if (folder / "tokenizer.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    from workbench.checkpoint.synthetic import APERTUS_8B_SHAPE, make_random_checkpoint

    assert {k: APERTUS_8B_SHAPE[k] for k in SHAPE} == SHAPE
    return make_random_checkpoint(
        folder, tokenizer="tekken", layers=LAYERS, n_ctx=1024, dtype=torch.bfloat16, **APERTUS_8B_SHAPE
    )


class PeakRSS:
    """The peak resident memory of this process while the block runs, sampled by a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.process, self.interval = psutil.Process(), interval

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def rise(self) -> int:
        return self.peak - self.start


def tool_call(tool: str, model, args):
    """The call that a tool's measurement times."""
    from workbench import lens, xielu
    from workbench.patching import PatchingExperiment

    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.d_vocab
    batch = torch.randint(4, vocab, (args.batch, args.pos), generator=gen)
    batch[:, 0] = model.tokenizer.bos_token_id
    prompt = batch[:1, : args.lens_pos] if args.lens_pos <= args.pos else None
    if prompt is None:
        prompt = torch.randint(4, vocab, (1, args.lens_pos), generator=gen)
        prompt[:, 0] = model.tokenizer.bos_token_id
    hf = model.hf_model
    if tool == "forward":
        return lambda: hf(batch)
    if tool == "forward_prompt":
        return lambda: hf(prompt)
    if tool == "xielu_statistics":
        return lambda: xielu.xielu_statistics(model, batch, batch_size=args.batch, progress=False)
    if tool == "neuron_view":
        return lambda: xielu.neuron_output_tokens(model, 0, 5, k=10)
    if tool == "logit_lens":
        return lambda: lens.logit_lens_table(model, prompt, k=5)
    if tool == "trajectory":
        return lambda: lens.target_trajectory(model, prompt, 123)
    if tool == "dla":
        return lambda: lens.direct_logit_attribution(model, prompt, 123, 456)
    if tool == "decomposition":
        return lambda: lens.residual_decomposition(model, prompt)
    if tool == "neuron_patching":
        corrupted = prompt.clone()
        corrupted[0, 3] = 7
        cells = [(0, n) for n in range(args.neurons)]

        def patch():
            experiment = PatchingExperiment(model, prompt, corrupted, (123, 456))
            return experiment.run(
                "neurons", "logit_diff", cells=cells, positions=[-1], normalize=False, progress=False
            )

        return patch
    raise ValueError(f"unknown tool {tool!r}")


def worker(args) -> None:
    """Load the checkpoint at `args.layers` layers and measure each tool in turn (one JSON line each).

    Between tools the allocator hands freed memory back (malloc_trim), so each rise is the tool's own.
    """
    import ctypes
    import gc

    import workbench

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    # the 1-layer model leaves the checkpoint's second layer unread: refused unless allowed
    model = workbench.load(
        build(args.folder),
        dtype=dtype,
        num_hidden_layers=args.layers,
        allow_missing_weights=args.layers < LAYERS,
    )
    trim = getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
    with torch.no_grad():
        model.hf_model(torch.tensor([[1, 5, 6, 7]]))  # warm-up: lazy allocations, kernels
    for tool in args.tools.split(","):
        call = tool_call(tool, model, args)
        gc.collect()
        if trim is not None:
            trim(0)
        with torch.no_grad(), PeakRSS() as rss:
            start = time.perf_counter()
            call()
            seconds = time.perf_counter() - start
        del call
        row = {"tool": tool, "layers": args.layers, "seconds": seconds, "rise": rss.rise}
        print(json.dumps(row), flush=True)


def measure(layers: int, args) -> dict[str, dict]:
    """One worker process at `layers` layers; its rows are echoed as they come (the calls take minutes)."""
    command = [sys.executable, __file__, "--worker", "yes", "--layers", str(layers)]
    for name in ("batch", "pos", "lens_pos", "neurons", "threads", "folder", "tools", "dtype"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    rows = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as worker:
        for line in worker.stdout:
            if line.startswith("{"):
                rows.append(json.loads(line))
                print(line.strip(), flush=True)
        stderr = worker.stderr.read()
    if worker.returncode:
        raise RuntimeError(f"the {layers}-layer worker failed:\n{stderr[-3000:]}")
    return {row["tool"]: row for row in rows}


def summarise(tool: str, one: dict | None, two: dict, args) -> dict:
    """Figures at 2 layers, per unit, and (when the 1-layer run exists) per layer and at 32 layers; NaN where
    the 1-layer run was skipped (``--layer-counts 2``)."""
    units = {"batch tokens": args.batch * args.pos, "prompt tokens": args.lens_pos, "neuron": args.neurons}
    per = units.get(TOOLS[tool][2], 1)
    row = {"tool": tool, "about": TOOLS[tool][0], "per": TOOLS[tool][2], "units": per}
    for key, scale in (("seconds", 1.0), ("rise", 1 / GB)):
        at_two = two[key] * scale
        per_layer = at_two - one[key] * scale if one is not None else float("nan")
        row[f"{key}_2_layers"] = at_two
        row[f"{key}_per_layer"] = per_layer
        row[f"{key}_per_layer_per_unit"] = per_layer / per
        row[f"{key}_per_unit_2_layers"] = at_two / per
        row[f"{key}_32_layers"] = at_two + 30 * per_layer
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pos", type=int, default=256)
    parser.add_argument("--lens-pos", type=int, default=512)
    parser.add_argument("--neurons", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument(
        "--layer-counts", default="1,2", choices=("1,2", "2"), help="'2' skips the 1-layer run (no per layer)"
    )
    parser.add_argument("--folder", type=Path, default=FOLDER, help="the checkpoint (built if absent)")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="the dtype the bf16 checkpoint is loaded in: float32 on CPUs without bf16 matmuls (activations "
        "then take twice the memory, so the memory figures are upper bounds for bf16)",
    )
    parser.add_argument("--markdown", type=Path, help="print the README table of a results JSON and stop")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=LAYERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.markdown:
        return print(markdown_table(json.loads(args.markdown.read_text())["tools"]))
    build(args.folder)
    one = measure(1, args) if args.layer_counts == "1,2" else {}
    two = measure(2, args)
    rows = [summarise(tool, one.get(tool), two[tool], args) for tool in args.tools.split(",")]
    by_tool = {r["tool"]: r for r in rows}
    for row in rows:
        base = TOOLS[row["tool"]][1]
        if base in by_tool:
            row["time_vs_forward"] = row["seconds_2_layers"] / by_tool[base]["seconds_2_layers"]
            row["extra_gb_vs_forward"] = row["rise_2_layers"] - by_tool[base]["rise_2_layers"]
    print_table(rows, args)
    print("\n" + markdown_table(rows))
    sizes = {"batch": args.batch, "pos": args.pos, "lens_pos": args.lens_pos, "neurons": args.neurons}
    sizes["layer_counts"], sizes["threads"], sizes["dtype"] = args.layer_counts, args.threads, args.dtype
    path = write_json("realdim", {"machine": machine(), "shape": SHAPE, "sizes": sizes, "tools": rows})
    print(f"wrote {path}")


def print_table(rows: list[dict], args) -> None:
    print(
        f"\nApertus-8B widths, {args.dtype}; statistics batch {args.batch} x {args.pos} tokens, "
        f"prompt {args.lens_pos} tokens, {args.neurons} neurons patched\n"
    )
    head = (
        f"{'tool':18} {'s (2 L)':>8} {'GB (2 L)':>9} {'s/layer':>8} {'GB/layer':>9} {'per':>13} "
        f"{'ms/unit/L':>10} {'MB/unit/L':>10} {'s (32 L)':>9} {'GB (32 L)':>10} {'x fwd':>6} {'+GB fwd':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r['time_vs_forward']:.2f}" if "time_vs_forward" in r else ""
        extra = f"{r['extra_gb_vs_forward']:+.2f}" if "extra_gb_vs_forward" in r else ""
        print(
            f"{r['tool']:18} {r['seconds_2_layers']:8.1f} {r['rise_2_layers']:9.2f} "
            f"{r['seconds_per_layer']:8.1f} {r['rise_per_layer']:9.3f} {r['per']:>13} "
            f"{1e3 * r['seconds_per_layer_per_unit']:10.2f} {1024 * r['rise_per_layer_per_unit']:10.3f} "
            f"{r['seconds_32_layers']:9.1f} {r['rise_32_layers']:10.2f} {ratio:>6} {extra:>8}"
        )


def markdown_table(rows: list[dict]) -> str:
    """The README's table: each tool at 2 layers, per layer and unit, and multiplied out to 32 layers."""
    lines = [
        "| tool | 2 layers: time, peak RSS rise | per layer | per layer and unit | 32 layers (estimate) "
        "| vs the forward (2 layers) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        unit = "token" if "tokens" in r["per"] else r["per"]
        versus = ""
        if "time_vs_forward" in r:
            versus = f"{r['time_vs_forward']:.2f}× time, {r['extra_gb_vs_forward']:+.2f} GB"
        if math.isnan(r["seconds_per_layer"]):  # run at 2 layers only
            layer = unit_layer = at_32 = "— (2 layers only)"
        else:
            layer = f"{r['seconds_per_layer']:.1f} s, {1024 * r['rise_per_layer']:.0f} MB"
            unit_layer = (
                f"{1e3 * r['seconds_per_layer_per_unit']:.1f} ms, "
                f"{1024 * r['rise_per_layer_per_unit']:.2f} MB per {unit}"
            )
            at_32 = f"{r['seconds_32_layers']:.0f} s, {r['rise_32_layers']:.2f} GB"
        lines.append(
            f"| {r['tool']} ({r['about']}) | {r['seconds_2_layers']:.1f} s, {r['rise_2_layers']:.2f} GB "
            f"| {layer} | {unit_layer} | {at_32} | {versus} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
