"""Train the embedded Apertus checkpoint from scratch on the synthetic corpus.

    python -m workbench.checkpoint.train                 # writes workbench/checkpoint/apertus-tiny/
    python -m workbench.checkpoint.train --out /tmp/tiny --steps 500

Seeded end to end (weights, data stream), CPU only. Writes config.json, generation_config.json,
model.safetensors, the tokenizer files and a README.md model card whose ability figures are measured by
:func:`workbench.checkpoint.evaluate.measure_abilities` on the saved checkpoint reloaded from disk.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import ApertusConfig, ApertusForCausalLM, AutoModelForCausalLM, AutoTokenizer

from workbench.checkpoint import DEFAULT_CHECKPOINT
from workbench.checkpoint.evaluate import (
    CARD_INDUCTION_LENGTH,
    CARD_INDUCTION_SEQUENCES,
    CARD_IOI_PROMPTS,
    induction_accuracy,
    induction_scores,
    measure_abilities,
    previous_token_scores,
)
from workbench.checkpoint.tokenizer import build_tokenizer
from workbench.data.corpus import (
    DEFAULT_MIXTURE,
    EVAL_SEED,
    IOI_TEMPLATES,
    repeated_token_ids,
    training_documents,
)

#: Seed of the samples ``--eval-every`` prints, distinct from the card's ``EVAL_SEED``.
MONITOR_SEED = 7_777


@dataclass
class Recipe:
    """Everything that determines the checkpoint (with the corpus code itself)."""

    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 4096
    rope_theta: float = 12_000_000.0
    mixture: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIXTURE))
    induction_lengths: tuple[int, int] = (4, 40)


def make_config(recipe: Recipe, tokenizer) -> ApertusConfig:
    """An Apertus config at toy scale: xIELU MLP, QK-norm and grouped-query attention as in Apertus."""
    return ApertusConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        hidden_act="xielu",
        max_position_embeddings=recipe.max_position_embeddings,
        # Apertus' llama3 RoPE, with its original/extended context ratio of 1/8 scaled to 4,096 positions
        # (transformers warns unless the original length is below max_position_embeddings).
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": recipe.rope_theta,
            "factor": 8.0,
            "original_max_position_embeddings": recipe.max_position_embeddings // 8,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def batches(recipe: Recipe, tokenizer):
    """Endless ``[batch, seq_len]`` rows, each starting at a document's ``<s>``.

    Documents (``<s> text </s>``) are packed until a row is full; the one that overflows is cut, so no row
    needs padding and every token is a real one.
    """
    docs = training_documents(
        recipe.seed, mixture=recipe.mixture, induction_lengths=tuple(recipe.induction_lengths)
    )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    while True:
        rows = []
        for _ in range(recipe.batch_size):
            row: list[int] = []
            while len(row) < recipe.seq_len:
                row += [bos, *tokenizer(next(docs), add_special_tokens=False)["input_ids"], eos]
            rows.append(row[: recipe.seq_len])
        yield torch.tensor(rows, dtype=torch.long)


def _optimizer(model, recipe: Recipe) -> torch.optim.Optimizer:
    # Decay matrices only: norms' gains and xIELU's scalar alphas keep their scale.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95))


def _lr_factor(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(recipe: Recipe, *, eval_every: int = 0, progress: bool = True):
    """Train and return ``(model, tokenizer, seconds)``."""
    tokenizer = build_tokenizer()
    torch.manual_seed(recipe.seed)
    model = ApertusForCausalLM(make_config(recipe, tokenizer))
    model.train()
    optimizer = _optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, recipe))
    data = batches(recipe, tokenizer)
    start = time.perf_counter()
    smoothed = None
    bar = tqdm(range(recipe.steps), desc="training", disable=not progress)
    for step in bar:
        ids = next(data)
        labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        scheduler.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if eval_every and (step + 1) % eval_every == 0:
            # A seed of its own, so the card's evaluation samples never steer a training run.
            figures = measure_abilities(model, tokenizer, seed=MONITOR_SEED, n_ioi=256, n_induction=64)
            bar.write(
                f"step {step + 1} ({time.perf_counter() - start:.0f}s, loss {smoothed:.3f}): "
                + ", ".join(f"{k}={v:.3g}" for k, v in figures.items())
            )
            model.train()
    return model, tokenizer, time.perf_counter() - start


def _cpu_name() -> str:
    return platform.processor() or platform.machine()


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6


def _head_list(scores, threshold: float) -> str:
    stacked = scores.stack().sort_values(ascending=False)
    heads = [
        f"{layer}.{head} ({value:.2f})" for (layer, head), value in stacked.items() if value >= threshold
    ]
    return ", ".join(heads) if heads else "none"


def describe_mechanisms(model, tokenizer) -> dict[str, str | float]:
    """Head-level facts for the card (informative; the tests check the figures of ``measure_abilities``)."""
    tokens = repeated_token_ids(tokenizer, CARD_INDUCTION_SEQUENCES, CARD_INDUCTION_LENGTH, EVAL_SEED)
    long_length = 100
    long_tokens = repeated_token_ids(tokenizer, 16, long_length, EVAL_SEED)
    return {
        "induction_heads": _head_list(induction_scores(model, tokens, CARD_INDUCTION_LENGTH), 0.5),
        "previous_token_heads": _head_list(previous_token_scores(model, tokens), 0.3),
        "long_length": long_length,
        "long_induction_accuracy": induction_accuracy(model, long_tokens, long_length),
    }


def model_card(
    recipe: Recipe, config: ApertusConfig, figures: dict, mechanisms: dict, seconds: float, n_params: int
) -> str:
    """The README.md of the checkpoint folder. The rows of the figures table are parsed back by the tests."""
    mixture = ", ".join(f"{k} {v:.0%}" for k, v in recipe.mixture.items())
    best = f"layer {figures['best_induction_layer']}, head {figures['best_induction_head']}"
    recipe_rows = "\n".join(f"| `{k}` | {v} |" for k, v in asdict(recipe).items())
    tokens_m = recipe.steps * recipe.batch_size * recipe.seq_len / 1e6
    return f"""---
library_name: transformers
pipeline_tag: text-generation
license: apache-2.0
tags: [apertus, interpretability, synthetic]
---

# apertus-tiny

A {n_params / 1e6:.2f}M-parameter `ApertusForCausalLM` trained from scratch by apertus-workbench on a
synthetic corpus whose mechanisms are known, so that the workbench's tools can be checked against them. It is
the default model of `workbench.load()` and needs neither network nor GPU. It is a toy: it knows only the
{config.vocab_size} words of its corpus (one token per word) and was trained on {recipe.seq_len}-token rows.

Load it with plain transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
model = AutoModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
pipeline("text-generation", model=folder)("When Mary and John went to the store, John gave a drink to")
```

## Architecture

Real Apertus components at toy scale: {config.num_hidden_layers} layers, d_model {config.hidden_size},
{config.num_attention_heads} query heads sharing {config.num_key_value_heads} key/value heads (grouped-query
attention), QK-norm, pre-norm RMSNorm, a non-gated MLP of width {config.intermediate_size} with the trainable
xIELU activation, llama3 RoPE (theta {recipe.rope_theta:g}, {config.max_position_embeddings} positions),
untied embeddings, float32.

## Training recipe

Corpus `workbench.data.corpus.training_documents(seed={recipe.seed})`, documents mixed as {mixture}:

- indirect-object sentences from {len(IOI_TEMPLATES)} templates ("When Mary and John went to the store, John
  gave a drink to Mary."), on name pairs of the train split only (`is_heldout_pair` reserves about one pair
  in eight for evaluation);
- a random sequence of 4 to 40 distinct words repeated twice (one time in five three times);
- one to three sentences of the tagged grammar.

Documents are packed as `<s> text </s>` into rows of {recipe.seq_len} tokens, {recipe.batch_size} rows a step,
{recipe.steps} steps (about {tokens_m:.1f}M tokens), cross-entropy on every token. AdamW (betas 0.9/0.95,
weight decay {recipe.weight_decay} on matrices only), peak learning rate {recipe.lr} after
{recipe.warmup_steps} warm-up steps, cosine decay to {recipe.min_lr_ratio:g} of the peak, gradient clipping
{recipe.grad_clip}, torch seed {recipe.seed}. Training took {seconds / 60:.1f} minutes on
{torch.get_num_threads()} CPU threads ({_cpu_name()}).

| setting | value |
|---|---|
{recipe_rows}

Why three layers: Apertus has no attention biases and no learned positions, so a head in the first layer
can only attend to "the previous token" once the embeddings share a content-independent direction. With two
layers the model learned IOI but no induction within 1,500 steps; with three, the first MLP supplies that
direction, a previous-token head forms in layer 1 and induction heads in layer 2, by step 750 to 1,000 in
our runs (seeds 0 and 1). Longer rows slowed everything down: with rows of 256 tokens and repeats of up
to 80 words, induction only began at step 1,750 and IOI had not appeared; with 512 tokens and up to 160
words, neither had appeared by step 1,500. Hence the short rows.

Retrain with `python -m workbench.checkpoint.train` (`--help` lists the options).

## Measured abilities

Measured on the saved checkpoint by `workbench.checkpoint.evaluate.measure_abilities(model, tokenizer)` on
freshly generated held-out samples drawn with seed {EVAL_SEED} (a seed training does not use):
{CARD_IOI_PROMPTS} IOI prompts over held-out name pairs, `ioi_prompts({CARD_IOI_PROMPTS}, {EVAL_SEED},
split="heldout")`, and {CARD_INDUCTION_SEQUENCES} sequences of {CARD_INDUCTION_LENGTH} distinct random tokens
repeated twice, `repeated_token_ids(tokenizer, {CARD_INDUCTION_SEQUENCES}, {CARD_INDUCTION_LENGTH},
{EVAL_SEED})`. `tests/test_checkpoint.py` recomputes them and requires agreement within 0.01 (accuracies,
logit difference) and 0.005 (induction score), the slack covering float reduction order.

| figure | value |
|---|---|
| `ioi_accuracy` | {figures["ioi_accuracy"]:.4f} |
| `ioi_logit_diff` | {figures["ioi_logit_diff"]:.4f} |
| `induction_accuracy` | {figures["induction_accuracy"]:.4f} |
| `max_induction_score` | {figures["max_induction_score"]:.4f} |

- IOI accuracy: the top-1 next token after "... gave a drink to", over the whole vocabulary, is the indirect
  object; logit difference: indirect object minus subject, averaged.
- Induction accuracy: top-1 on the second copy, its first token excluded (nothing announces the repeat).
- Induction score: a head's mean attention from a second-copy token to the token that followed its first
  occurrence; the strongest head is {best}.

## Mechanisms

On the same induction samples (heads as `layer.head`, score in brackets):

- induction heads (score >= 0.5): {mechanisms["induction_heads"]};
- previous-token heads (mean attention to the previous token >= 0.3): {mechanisms["previous_token_heads"]}.

Beyond the training length the induction circuit fades: on 16 sequences of {mechanisms["long_length"]} tokens
repeated twice ({2 * mechanisms["long_length"] + 1} tokens), induction accuracy is
{mechanisms["long_induction_accuracy"]:.2f}. The model runs on prompts up to
{config.max_position_embeddings} tokens, but was only trained on {recipe.seq_len}.
"""


def save(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for f in out.iterdir():
        # safetensors writes through a private temp file (mode 600); a shared install must be readable.
        f.chmod(0o644)


def main(argv: list[str] | None = None) -> None:
    defaults = Recipe()
    parser = argparse.ArgumentParser(
        prog="python -m workbench.checkpoint.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT, help="output folder")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (%(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="weights and data seed (%(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (%(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="rows per step (%(default)s)"
    )
    parser.add_argument("--layers", type=int, default=defaults.num_hidden_layers, help="(%(default)s)")
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size, help="(%(default)s)")
    parser.add_argument(
        "--intermediate-size", type=int, default=defaults.intermediate_size, help="(%(default)s)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--eval-every", type=int, default=0, help="print abilities every N steps (0: never)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    recipe = Recipe(
        seed=args.seed,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        num_hidden_layers=args.layers,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
    )
    model, tokenizer, seconds = train(recipe, eval_every=args.eval_every)
    save(model, tokenizer, args.out)

    # Measure what was written, exactly as a user (and the tests) will load it.
    reloaded = AutoModelForCausalLM.from_pretrained(args.out)
    reloaded_tok = AutoTokenizer.from_pretrained(args.out)
    figures = measure_abilities(reloaded, reloaded_tok)
    mechanisms = describe_mechanisms(reloaded, reloaded_tok)
    n_params = sum(p.numel() for p in reloaded.parameters())
    card = model_card(recipe, reloaded.config, figures, mechanisms, seconds, n_params)
    (args.out / "README.md").write_text(card)
    print(f"trained in {seconds / 60:.1f} min; wrote {args.out} ({_size_mb(args.out):.1f} MB)")
    for key, value in figures.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")


if __name__ == "__main__":
    main()
