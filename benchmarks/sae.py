"""SAE speed: training from a harvest on disk against the same loop fed from memory; the feature-view
dataset pass against a plain forward.

1. Training throughput (activations per second) of ``train_sae`` on ``HarvestSource`` (safetensors shards
   streamed from disk, one shard in memory) against ``TensorSource`` (the same activations already in
   memory), same settings, interleaved rounds in the same run. Target: disk >= 0.9x memory.
2. ``feature_statistics`` (forward to the SAE's layer, encode, streaming top-k / typical / histograms)
   against a plain forward of the same prompts (``model(..., return_type=None)``). Reported.
3. Patching SAE latents: ``PatchingExperiment.run(("sae_latents", sae), cells=...)`` (batched variants, each
   entering at the SAE's layer) against a loop of one hand-written hooked run per latent, same cells (the
   first ``--latents``), 8 IOI prompt pairs, error term kept. Reported.

The model is the embedded checkpoint; the text is its training corpus. Float32, CPU unless CUDA is present.

    python benchmarks/sae.py [--texts 400 --steps 200 --rounds 3 --threads 1 --latents 128]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, time_interleaved, write_json  # noqa: E402

import workbench  # noqa: E402
from workbench.data import corpus  # noqa: E402
from workbench.patching import PatchingExperiment  # noqa: E402
from workbench.probing import harvest  # noqa: E402
from workbench.sae import (  # noqa: E402
    HarvestSource,
    TensorSource,
    feature_statistics,
    latent_hook,
    splice,
    text_dataset,
    train_sae,
)
from workbench.sae.metrics import encode_prompts  # noqa: E402

HOOK = "blocks.1.hook_resid_post"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=400)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--latents", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = workbench.load()
    texts = corpus.training_corpus(args.texts, seed=7)
    folder = Path(tempfile.mkdtemp())
    try:
        data = text_dataset(texts).encode(model.tokenizer, subtokens="every")
        acts = harvest(model, data, folder / "h", hooks=[HOOK], shard_sentences=100, progress=False)
        disk = HarvestSource(acts, HOOK)
        memory = TensorSource(acts.load([HOOK])[HOOK], HOOK, shard_rows=max(disk.sizes))
        settings = dict(
            architecture="topk", expansion=8, k=16, steps=args.steps, batch_size=args.batch, progress=False
        )
        rates = {"disk": [], "memory": []}

        def run(name, source):
            rates[name].append(train_sae(source, **settings).activations_per_second)

        training = time_interleaved(
            {"memory": lambda: run("memory", memory), "disk": lambda: run("disk", disk)},
            baseline="memory",
            rounds=args.rounds,
            warmup=1,
        )
        sae = train_sae(memory, **settings).sae
        tokens, mask = encode_prompts(model, texts)

        def forward():
            with torch.no_grad():
                for s in range(0, len(tokens), 16):
                    model(tokens[s : s + 16], attention_mask=mask[s : s + 16], return_type=None)

        view = time_interleaved(
            {
                "forward": forward,
                "feature_statistics": lambda: feature_statistics(model, sae, tokens, progress=False),
            },
            baseline="forward",
            rounds=args.rounds,
            warmup=1,
        )
        patching = time_latent_patching(model, sae, args.latents, args.rounds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rate = {name: sorted(values)[len(values) // 2] for name, values in rates.items()}
    payload = {
        "machine": machine(),
        "activations": disk.n_rows,
        "training": {
            **training,
            "activations_per_second": rate,
            "disk_over_memory": rate["disk"] / rate["memory"],
        },
        "feature_view": view,
        "latent_patching": {**patching, "cells": args.latents, "prompt_pairs": 8},
    }
    print(f"training on {disk.n_rows} activations x {disk.width}, {args.steps} steps of {args.batch}:")
    print(
        f"  memory {rate['memory']:,.0f} act/s, harvest on disk {rate['disk']:,.0f} act/s "
        f"({rate['disk'] / rate['memory']:.2f}x)"
    )
    print(
        f"feature_statistics {view['feature_statistics']['median_s']:.2f} s vs forward "
        f"{view['forward']['median_s']:.2f} s ({view['feature_statistics']['ratio']:.2f}x)"
    )
    print(
        f"patching {args.latents} SAE latents: batched {patching['batched']['median_s']:.2f} s vs a loop of "
        f"hooked runs {patching['loop']['median_s']:.2f} s ({patching['batched']['ratio']:.2f}x)"
    )
    print(write_json("sae", payload))


def time_latent_patching(model, sae, n_latents: int, rounds: int) -> dict:
    pairs = corpus.ioi_prompts(8, seed=3)
    answers = [(p.answer, p.wrong) for p in pairs]
    name, layer = latent_hook(sae), int(HOOK.split(".")[1])
    cells = [(layer, f) for f in range(min(n_latents, sae.cfg.d_sae))]
    with splice(model, sae, use_error_term=True):
        exp = PatchingExperiment(model, [p.clean for p in pairs], [p.corrupted for p in pairs], answers)
        source = exp.activations("clean", [name])[name]

        def batched():
            exp.run(("sae_latents", sae), cells=cells, skip_identical=False, progress=False)

        def loop():
            for _, f in cells:

                def patch(acts, hook, f=f):
                    acts = acts.clone()
                    acts[..., f] = source[..., f]
                    return acts

                with torch.no_grad():
                    model.run_with_hooks(
                        exp.corrupted_tokens, attention_mask=exp.mask, fwd_hooks=[(name, patch)]
                    )

        return time_interleaved({"loop": loop, "batched": batched}, baseline="loop", rounds=rounds, warmup=1)


if __name__ == "__main__":
    main()
