"""Benchmark: a full layers x positions residual-stream sweep, our engine vs TransformerLens's patching.

    python benchmarks/patching.py                # writes benchmarks/results/patching.json
    python benchmarks/patching.py --repeats 5 --threads 2

For each model (the embedded checkpoint, when trained, and a random 8-layer d_model=512 model with 8 query
/ 4 KV heads), the same token ids and metric go through `workbench.patching` (on HookedApertus) and
`transformer_lens.patching.get_act_patch_resid_pre` (on TransformerBridge), interleaved in the same process
so both see the same machine load. Each timing covers a whole experiment from the prompts: our clean and
corrupted runs and the sweep; TL's clean `run_with_cache` and its sweep. Also timed: our sweep without the
skip of cells where both runs agree (pure batching), and attribution patching with its correlation to the
exact sweep.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("transformers.activations").setLevel(logging.ERROR)

RESULTS = Path(__file__).parent / "results" / "patching.json"


def ioi_pair(model) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], str]:
    from workbench.data.corpus import ioi_prompts

    p = ioi_prompts(1, templates=[0], corruption="s2")[0]
    answers = (model.to_single_token(p.answer), model.to_single_token(p.wrong))
    return (
        model.to_tokens(p.clean),
        model.to_tokens(p.corrupted),
        answers,
        f"IOI: {p.clean!r} / {p.corrupted!r}",
    )


def random_pair(
    model, length: int = 18, changed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], str]:
    gen = torch.Generator().manual_seed(0)
    bos = model.tokenizer.bos_token_id
    clean = torch.cat(
        [torch.tensor([[bos]]), torch.randint(4, model.cfg.d_vocab, (1, length - 1), generator=gen)], 1
    )
    corrupted = clean.clone()
    for i in range(changed):  # the middle token(s) replaced, as in an IOI subject swap
        pos = length // 2 + i
        corrupted[0, pos] = 4 + (clean[0, pos] - 4 + 1) % (model.cfg.d_vocab - 4)
    return (
        clean,
        corrupted,
        (10, 11),
        f"{length} random tokens, {changed} changed from position {length // 2}",
    )


def logit_diff(answers):
    def metric(logits):
        return logits[:, -1, answers[0]] - logits[:, -1, answers[1]]

    return lambda logits: metric(logits).mean()


def bench_model(name: str, folder: Path, pair_fn, repeats: int) -> dict:
    import transformer_lens.patching as tl_patching
    from transformer_lens.model_bridge import TransformerBridge

    import workbench
    from workbench.patching import PatchingExperiment, correlation

    model = workbench.load(folder)
    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
    clean, corrupted, answers, prompt = pair_fn(model)
    metric = logit_diff(answers)

    def ours(skip: bool = True):
        experiment = PatchingExperiment(model, clean, corrupted, answers)
        return experiment.run("resid_pre", "logit_diff", normalize=False, progress=False, skip_identical=skip)

    def theirs():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(clean)
            return tl_patching.get_act_patch_resid_pre(bridge, corrupted, cache, metric)

    def attribution():
        experiment = PatchingExperiment(model, clean, corrupted, answers)
        return experiment.attribute("resid_pre", "logit_diff", normalize=False)

    ours(), theirs(), attribution()  # warm-up: allocator, lazy imports
    times: dict[str, list[float]] = {
        "ours": [],
        "ours_no_skip": [],
        "transformer_lens": [],
        "attribution": [],
    }
    for _ in range(repeats):  # interleaved, so a change in machine load hits every method alike
        for key, fn in (
            ("ours", ours),
            ("transformer_lens", theirs),
            ("ours_no_skip", lambda: ours(False)),
            ("attribution", attribution),
        ):
            start = time.perf_counter()
            out = fn()
            times[key].append(time.perf_counter() - start)
            if key == "ours":
                exact = out
            elif key == "transformer_lens":
                reference = out.double()
            elif key == "ours_no_skip":
                no_skip = out
            else:
                approx = out
    median = {k: statistics.median(v) for k, v in times.items()}
    stats = correlation(exact, approx)
    cfg = model.cfg
    return {
        "model": name,
        "shape": f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads / "
        f"{cfg.n_key_value_heads} KV, d_mlp {cfg.d_mlp}, vocab {cfg.d_vocab}",
        "prompt": prompt,
        "cells": len(exact.cells),
        "seconds_median": median,
        "seconds_all": times,
        "speedup_vs_transformer_lens": median["transformer_lens"] / median["ours"],
        "speedup_without_skip": median["transformer_lens"] / median["ours_no_skip"],
        "max_abs_diff_vs_transformer_lens": (exact.grid() - reference).abs().max().item(),
        "max_abs_diff_without_skip": (no_skip.grid() - reference).abs().max().item(),
        "attribution_spearman": float(stats["spearman"]),
        "attribution_pearson": float(stats["pearson"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from workbench.checkpoint import DEFAULT_CHECKPOINT
    from workbench.checkpoint.synthetic import make_random_checkpoint

    runs = []
    if (DEFAULT_CHECKPOINT / "model.safetensors").exists():
        runs.append(bench_model("embedded apertus-tiny", DEFAULT_CHECKPOINT, ioi_pair, args.repeats))
    else:
        print(f"skipping the embedded model: {DEFAULT_CHECKPOINT}/model.safetensors is not trained yet")
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_random_checkpoint(
            Path(tmp) / "random8", layers=8, d_model=512, heads=8, kv_heads=4, vocab=512
        )
        runs.append(bench_model("random 8-layer", folder, random_pair, args.repeats))
        runs.append(
            bench_model(
                "random 8-layer, 3 tokens changed", folder, lambda m: random_pair(m, changed=3), args.repeats
            )
        )

    report = {
        "benchmark": "full layers x positions resid_pre sweep, logit difference, one prompt pair",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
        },
        "runs": runs,
    }
    for run in runs:
        t = run["seconds_median"]
        print(
            f"{run['model']} ({run['cells']} cells): ours {t['ours']:.3f}s "
            f"(no skip {t['ours_no_skip']:.3f}s), "
            f"TransformerLens {t['transformer_lens']:.3f}s -> {run['speedup_vs_transformer_lens']:.1f}x "
            f"({run['speedup_without_skip']:.1f}x without skip); "
            f"max |diff| {run['max_abs_diff_vs_transformer_lens']:.2e}; "
            f"attribution {t['attribution']:.3f}s, Spearman {run['attribution_spearman']:.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".json.tmp")
    partial.write_text(json.dumps(report, indent=2))
    partial.replace(args.out)  # never a half-written result
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
