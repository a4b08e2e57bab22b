"""Train the multilingual embedded checkpoint (apertus-tiny-multi) on the multilingual synthetic corpus.

    python -m workbench.checkpoint.train_multilingual   # writes workbench/checkpoint/apertus-tiny-multi/
    python -m workbench.checkpoint.train_multilingual --out /tmp/multi --steps 300
    python -m workbench.checkpoint.train_multilingual --card-only  # re-measure and rewrite README.md only

The recipe machinery is apertus-tiny's (:mod:`workbench.checkpoint.train`: ``Recipe``, ``make_config``,
``save``); the corpus is :mod:`workbench.data.multilingual` (English, German-like and French-like grammar
sentences and translation lines) and the tokenizer is the word-level one of
:mod:`workbench.checkpoint.tokenizer` over that corpus's vocabulary. Seeded end to end, CPU only.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import ApertusForCausalLM

from workbench.checkpoint.tokenizer import build_tokenizer
from workbench.checkpoint.train import Recipe, make_config, save
from workbench.data import multilingual as ml
from workbench.inputs import last_token_index

#: Where the multilingual checkpoint ships.
MULTI_CHECKPOINT = Path(__file__).parent / "apertus-tiny-multi"
#: Seed of the prompts ``--eval-every`` prints (the card and the tests use EVAL_SEED or all prompts).
MONITOR_SEED = 7_777


@dataclass
class MultiRecipe(Recipe):
    """apertus-tiny's recipe with the multilingual mixture, smaller and on shorter rows: two layers of width
    96 suffice (no induction is needed) and train in minutes on a shared 2-core machine."""

    steps: int = 1000
    batch_size: int = 48
    seq_len: int = 64
    lr: float = 3e-3
    hidden_size: int = 96
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    mixture: dict[str, float] = field(default_factory=lambda: dict(ml.DEFAULT_MIXTURE))
    language_weights: dict[str, float] = field(default_factory=lambda: dict(ml.DEFAULT_LANGUAGE_WEIGHTS))


def build_multilingual_tokenizer():
    """One token per word of every language (:func:`workbench.data.multilingual.vocabulary`)."""
    return build_tokenizer(ml.vocabulary())


def batches(recipe: MultiRecipe, tokenizer):
    """Endless ``[batch, seq_len]`` rows of packed ``<s> text </s>`` documents (as apertus-tiny's)."""
    docs = ml.training_documents(
        recipe.seed, mixture=recipe.mixture, language_weights=recipe.language_weights
    )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer
    pending: list[list[int]] = []
    while True:
        rows = []
        for _ in range(recipe.batch_size):
            row: list[int] = []
            while len(row) < recipe.seq_len:
                if not pending:  # tokenizing many documents in one call is several times faster
                    texts = [next(docs) for _ in range(256)]
                    pending = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)][::-1]
                row += [bos, *pending.pop(), eos]
            rows.append(row[: recipe.seq_len])
        yield torch.tensor(rows, dtype=torch.long)


def _lr_factor(step: int, recipe: Recipe) -> float:
    # Linear warm-up, cosine decay to min_lr_ratio: apertus-tiny's schedule.
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def translation_accuracy(model, tokenizer, prompts) -> float:
    """Top-1 accuracy (whole vocabulary) of the answers to translation prompts, with plain transformers."""
    was_training = model.training
    model.eval()
    backend = tokenizer.backend_tokenizer
    rows = [
        [tokenizer.bos_token_id, *e.ids]
        for e in backend.encode_batch([p.prompt for p in prompts], add_special_tokens=False)
    ]
    answers = torch.tensor([backend.encode(p.answer, add_special_tokens=False).ids[0] for p in prompts])
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    last = logits[torch.arange(len(rows)), last_token_index(mask)]
    model.train(was_training)
    return float((last.argmax(-1) == answers).float().mean())


def train(recipe: MultiRecipe, *, progress: bool = True, eval_every: int = 0):
    """Train and return ``(model, tokenizer, seconds)``."""
    tokenizer = build_multilingual_tokenizer()
    torch.manual_seed(recipe.seed)
    model = ApertusForCausalLM(make_config(recipe, tokenizer))
    model.train()
    # Decay matrices only, as apertus-tiny: norms' gains and xIELU's scalars keep their scale.
    groups = [
        {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": recipe.weight_decay},
        {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, recipe))
    data = batches(recipe, tokenizer)
    start, smoothed = time.perf_counter(), None
    bar = tqdm(range(recipe.steps), desc="training", disable=not progress)
    for step in bar:
        ids = next(data)
        loss = model(input_ids=ids, labels=ids.masked_fill(ids == tokenizer.pad_token_id, -100)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        scheduler.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.3f}")
        if eval_every and (step + 1) % eval_every == 0:
            accuracy = translation_accuracy(model, tokenizer, ml.translation_prompts(300, seed=MONITOR_SEED))
            bar.write(
                f"step {step + 1} ({time.perf_counter() - start:.0f}s): translation accuracy {accuracy:.3f}"
            )
    return model, tokenizer, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    defaults = MultiRecipe()
    parser = argparse.ArgumentParser(
        prog="python -m workbench.checkpoint.train_multilingual", description=__doc__
    )
    parser.add_argument("--out", type=Path, default=MULTI_CHECKPOINT, help="output folder")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (%(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="weights and data seed (%(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--eval-every", type=int, default=0, help="print translation accuracy every N steps")
    parser.add_argument("--card-only", action="store_true", help="re-measure the saved checkpoint's card")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    recipe = MultiRecipe(seed=args.seed, steps=args.steps)
    if not args.card_only:
        model, tokenizer, seconds = train(recipe, eval_every=args.eval_every)
        save(model, tokenizer, args.out)
        (args.out / "recipe.json").write_text(
            json.dumps({**asdict(recipe), "seconds": seconds, "threads": args.threads}, indent=1)
        )
        print(f"trained in {seconds / 60:.1f} min; wrote {args.out}")
    from workbench.checkpoint.multilingual_card import write_card

    write_card(args.out)


if __name__ == "__main__":
    main()
