"""Generation speed: tokens per second of `model.generate` with no hooks and with a steering hook, against
transformers' `hf_model.generate` on the same prompts in the same run (target: >= 0.9x with the hook).

Greedy, a batch of prompts padded on the left, a fixed number of new tokens (end tokens ignored, so every
variant produces the same count). Models: a random Apertus of 8 layers, d_model 512 (large enough that the
forward, not Python, dominates on the CPU) and the embedded checkpoint.

    python benchmarks/generate.py [--new-tokens 64] [--batch 4] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from common import machine, time_interleaved, write_json

import workbench
from workbench.interventions import Steer

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The cat",
    "Then, Anna and Omar went to the park. Omar gave a book to",
    "Friends Lena and Hugo found a key at the museum.",
]


def random_model(folder: Path, **shape):
    """A random Apertus of `shape` with the embedded model's tokenizer, loaded from `folder`."""
    from workbench.checkpoint.synthetic import random_apertus
    from workbench.checkpoint.tokenizer import build_tokenizer

    tok = build_tokenizer()
    random_apertus(vocab=len(tok), **shape).save_pretrained(folder)
    tok.save_pretrained(folder)
    return workbench.load(folder)


def measure(model, batch: int, new_tokens: int, rounds: int) -> dict:
    prompts = (PROMPTS * batch)[:batch]
    tokens, mask = model.tokenize(prompts, padding_side="left")
    steer = Steer(torch.randn(model.cfg.d_model) / model.cfg.d_model**0.5, model.cfg.n_layers // 2, alpha=1.0)
    hooks = steer.hooks(model)
    common = dict(attention_mask=mask, return_type="tokens", progress=False, eos_token_id=[])

    def hf():
        with torch.no_grad():
            return model.hf_model.generate(
                input_ids=tokens,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                eos_token_id=[],
                do_sample=False,
                pad_token_id=model.pad_token_id,
            )

    variants = {
        "transformers generate": hf,
        "generate, no hooks": lambda: model.generate(tokens, new_tokens, **common),
        "generate, steering hook": lambda: model.generate(tokens, new_tokens, fwd_hooks=hooks, **common),
    }
    assert torch.equal(variants["generate, no hooks"](), hf()), "greedy generation differs from transformers'"
    rows = time_interleaved(variants, "transformers generate", rounds=rounds, warmup=1)
    for row in rows.values():
        row["tokens_per_s"] = batch * new_tokens / row["median_s"]
        row["vs_transformers"] = 1 / row["ratio"]  # throughput relative to transformers' generate
    return {"batch": batch, "new_tokens": new_tokens, "prompt_tokens": tokens.shape[1], "variants": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers.activations").setLevel(logging.ERROR)
    workdir = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    results = {}
    try:
        wide = random_model(workdir / "wide", layers=8, d_model=512, heads=8, kv_heads=2, d_mlp=2048)
        results["random 8 layers, d_model 512"] = measure(wide, args.batch, args.new_tokens, args.rounds)
        results["embedded checkpoint"] = measure(workbench.load(), args.batch, args.new_tokens, args.rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    path = write_json("generate", {"machine": machine(), "results": results})
    print("| model | variant | tokens/s | vs transformers' generate |\n| --- | --- | ---: | ---: |")
    for model, result in results.items():
        for name, row in result["variants"].items():
            print(f"| {model} | {name} | {row['tokens_per_s']:.0f} | {row['vs_transformers']:.2f}x |")
    print(f"(batch {args.batch}, {args.new_tokens} new tokens, greedy, {args.threads} thread(s); {path})")


if __name__ == "__main__":
    main()
