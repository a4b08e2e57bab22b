"""What the hooks cost: HookedApertus against the plain transformers forward, TransformerBridge and nnsight.

Random Apertus, 8 layers, d_model 512, 8 heads / 4 KV heads, float32 on the CPU, batch 4 x 256 tokens.
Every variant runs once per round, interleaved, and is reported as the median ratio to the plain
transformers SDPA forward of the same round. Targets: no hooks <= 1.03x, residual cache <= 1.10x,
full cache faster than the bridge's full cache.

    python benchmarks/overhead.py [--batch 4 --length 256 --rounds 11 --check]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, time_interleaved, write_json  # noqa: E402

import workbench  # noqa: E402
from workbench.checkpoint.synthetic import make_random_checkpoint  # noqa: E402

SHAPE = dict(layers=8, d_model=512, heads=8, kv_heads=4, d_mlp=2048, vocab=1024, n_ctx=2048)


def nnsight_variants(hf, tokens):
    from nnsight import NNsight

    wrapped = NNsight(hf)
    layers = hf.model.layers

    def forward():
        with wrapped.trace(tokens):
            wrapped.output.logits.save()

    def resid():
        saved = []
        with wrapped.trace(tokens):
            for i in range(len(layers)):
                saved.append(wrapped.model.layers[i].output.save())
            wrapped.output.logits.save()

    def everything():
        # nnsight sees module outputs only: attention patterns stay inside SDPA, unreachable.
        saved = []
        with wrapped.trace(tokens):
            saved.append(wrapped.model.embed_tokens.output.save())
            for i in range(len(layers)):
                layer = wrapped.model.layers[i]
                for module in (
                    layer.attention_layernorm,
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                    layer.self_attn.q_norm,
                    layer.self_attn.k_norm,
                    layer.self_attn.o_proj,
                    layer.feedforward_layernorm,
                    layer.mlp.up_proj,
                    layer.mlp.act_fn,
                    layer.mlp.down_proj,
                    layer,
                ):
                    saved.append(module.output.save())
            saved.append(wrapped.model.norm.output.save())
            wrapped.output.logits.save()

    return {"nnsight forward": forward, "nnsight cache resid_post": resid, "nnsight cache all": everything}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    from transformer_lens.model_bridge import TransformerBridge

    with tempfile.TemporaryDirectory() as folder:
        make_random_checkpoint(folder, **SHAPE)
        model = workbench.load(folder)
        bridge = TransformerBridge.boot_transformers(folder, device="cpu")
    hf = model.hf_model
    hf.config._attn_implementation = "sdpa"
    tokens = torch.randint(4, SHAPE["vocab"], (args.batch, args.length))
    resid = lambda name: name.endswith("hook_resid_post")  # noqa: E731

    variants = {
        "transformers sdpa": lambda: hf(tokens),
        "workbench no hooks": lambda: model(tokens),
        "workbench cache resid_post": lambda: model.run_with_cache(tokens, names_filter=resid),
        "workbench cache all": lambda: model.run_with_cache(tokens),
        "bridge forward": lambda: bridge(tokens),
        "bridge cache resid_post": lambda: bridge.run_with_cache(tokens, names_filter=resid),
        "bridge cache all": lambda: bridge.run_with_cache(tokens),
        **nnsight_variants(hf, tokens),
    }
    with torch.inference_mode():
        rows = time_interleaved(variants, baseline="transformers sdpa", rounds=args.rounds)

    targets = {
        "no hooks <= 1.03x": rows["workbench no hooks"]["ratio"] <= 1.03,
        "resid_post cache <= 1.10x": rows["workbench cache resid_post"]["ratio"] <= 1.10,
        "full cache faster than bridge's": rows["workbench cache all"]["median_s"]
        < rows["bridge cache all"]["median_s"],
    }
    print(
        f"\nB{args.batch} x T{args.length}, {SHAPE}, {args.rounds} interleaved rounds, {args.threads} threads"
    )
    print(f"{'variant':32s} {'median s':>10s} {'ratio':>7s}")
    for name, row in rows.items():
        print(f"{name:32s} {row['median_s']:10.4f} {row['ratio']:7.3f}")
    for target, ok in targets.items():
        print(f"{'PASS' if ok else 'MISS'}  {target}")
    path = write_json(
        "overhead",
        {"args": vars(args), "shape": SHAPE, "machine": machine(), "rows": rows, "targets": targets},
    )
    print(f"wrote {path}")
    if args.check and not all(targets.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
