"""Benchmark: edge attribution (EAP, EAP-IG) over every edge of a random 8-layer model vs exact edge patching.

    python benchmarks/circuits.py                # writes benchmarks/results/circuits.json
    python benchmarks/circuits.py --repeats 3 --threads 2

A random 8-layer GQA model (8 query / 4 KV heads, d_model 256: 4,557 edges), 2 prompt pairs of 10 random
tokens with 3 changed from the middle on. In the same process: exact edge patching of every edge (batched),
EAP (one forward and backward), EAP-IG (8 steps); timings interleaved, and the rank (Spearman) and Pearson
correlation of each estimate with the exact scores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results" / "circuits.json"


def pairs(model, n: int = 2, length: int = 10, changed: int = 3):
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(4, model.cfg.d_vocab, (n, length), generator=generator)
    clean[:, 0] = model.tokenizer.bos_token_id if model.tokenizer is not None else 1
    corrupted = clean.clone()
    middle = slice(length // 2, length // 2 + changed)
    corrupted[:, middle] = 4 + (clean[:, middle] - 4 + 1) % (model.cfg.d_vocab - 4)
    return clean, corrupted, (10, 11)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import workbench
    from workbench.checkpoint.synthetic import make_random_checkpoint
    from workbench.circuits import Graph, agreement, edge_attribution, edge_patch
    from workbench.patching import PatchingExperiment

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_random_checkpoint(
            Path(tmp) / "random8", layers=8, d_model=256, heads=8, kv_heads=4, vocab=512
        )
        model = workbench.load(folder)
    clean, corrupted, answers = pairs(model)

    def experiment():
        return PatchingExperiment(model, clean, corrupted, answers)

    methods = {
        "exact": lambda: edge_patch(experiment(), "logit_diff", normalize=False, progress=False),
        "eap": lambda: edge_attribution(experiment(), "logit_diff", normalize=False),
        "eap_ig": lambda: edge_attribution(experiment(), "logit_diff", method="eap-ig", normalize=False),
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    results = {}
    for _ in range(args.repeats):  # interleaved, so a change in machine load hits every method alike
        for name, fn in methods.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    cfg = model.cfg
    report = {
        "benchmark": "every edge of a random 8-layer model: exact edge patching vs EAP / EAP-IG",
        "shape": f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads / "
        f"{cfg.n_key_value_heads} KV",
        "edges": len(Graph(cfg).edges),
        "prompt_pairs": clean.shape[0],
        "tokens": clean.shape[1],
        "seconds_median": median,
        "seconds_all": times,
        "speedup_eap_vs_exact": median["exact"] / median["eap"],
        "speedup_eap_ig_vs_exact": median["exact"] / median["eap_ig"],
        "eap": agreement(results["exact"], results["eap"]).to_dict(),
        "eap_ig": agreement(results["exact"], results["eap_ig"]).to_dict(),
        "machine": {
            "platform": platform.platform(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
        },
    }
    print(
        f"{report['edges']} edges: exact {median['exact']:.2f}s, EAP {median['eap']:.2f}s "
        f"({report['speedup_eap_vs_exact']:.0f}x), EAP-IG {median['eap_ig']:.2f}s; Spearman with exact: "
        f"EAP {report['eap']['spearman']:.3f}, EAP-IG {report['eap_ig']['spearman']:.3f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".json.tmp")
    partial.write_text(json.dumps(report, indent=2))
    partial.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
