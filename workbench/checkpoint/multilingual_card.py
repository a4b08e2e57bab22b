"""Measure the multilingual embedded checkpoint and write its model card (README.md).

:func:`measure` computes every figure of the card with the analyses of :mod:`workbench.multilingual` on
fixed, seeded samples (:data:`workbench.data.corpus.EVAL_SEED`, which training never uses);
``tests/test_multilingual.py`` recomputes the tested ones with the same settings (the constants below).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd

from workbench.data import multilingual as ml
from workbench.data.alignment import TokenLabelledDataset
from workbench.data.corpus import EVAL_SEED
from workbench.inputs import last_token_index

#: Settings of the card's figures (the tests use the same).
CARD_TEXTS = 200  # grammar sentences per language for neuron statistics and losses
CARD_PROBE_SENTENCES = 300  # parallel tagged sentences per language for probing
CARD_NEURON_FRACTION = 0.05  # share of all xIELU neurons selected by LAPE
CARD_LENS_PAIR = ("de", "fr")  # latent-language lens: source, target (pivot English)


def translation_table(model) -> pd.DataFrame:
    """Every translation prompt (all content words, all six directions): the top-1 prediction at the last
    position over the whole vocabulary, and whether it is the answer."""
    from workbench.multilingual.engine import tokenize
    from workbench.multilingual.latent import answer_token

    prompts = ml.translation_prompts()
    tokens, mask = tokenize(model, [p.prompt for p in prompts])
    logits = model(tokens, attention_mask=mask)
    last = logits[range(len(prompts)), last_token_index(mask)].argmax(-1).tolist()
    answers = [answer_token(model.tokenizer, p.words[p.target]) for p in prompts]
    return pd.DataFrame(
        {
            "source": [p.source for p in prompts],
            "target": [p.target for p in prompts],
            "concept": [p.concept for p in prompts],
            "answer": [p.answer for p in prompts],
            "correct": [a == b for a, b in zip(last, answers)],
        }
    )


def neuron_ablation(model, *, fraction: float = CARD_NEURON_FRACTION, n_texts: int = CARD_TEXTS):
    """LAPE selection on one sample, ablation measured on another: ``(activation, selection, ablation)``;
    the ablation also silences a random group as large as the largest language's (``"random"``)."""
    from workbench.multilingual import (
        ablate_neurons,
        language_activation,
        neurons_by_language,
        random_neurons,
    )

    activation = language_activation(model, ml.language_texts(n_texts, EVAL_SEED), progress=False)
    selection = activation.select(fraction=fraction)
    groups = neurons_by_language(selection)
    size = max(len(v) for v in groups.values())
    groups["random"] = random_neurons(model.cfg.n_layers, model.cfg.d_mlp, size, seed=EVAL_SEED)
    held_out = ml.language_texts(n_texts, EVAL_SEED + 1)
    return activation, selection, ablate_neurons(model, groups, held_out, progress=False)


def probing(model, folder: str | Path, n: int = CARD_PROBE_SENTENCES):
    """Part-of-speech probes per language and their transfer (:func:`cross_lingual_probes`)."""
    from workbench.multilingual import cross_lingual_probes

    tagged = ml.multilingual_tagged(n, EVAL_SEED)
    data = {k: TokenLabelledDataset.from_tagged(v, "pos") for k, v in tagged.items()}
    return cross_lingual_probes(model, data, folder, progress=False)


def measure(model) -> dict:
    """Every figure of the card (see the module docstring)."""
    from workbench.multilingual import fertility_table, latent_language_lens

    translations = translation_table(model)
    per_direction = translations.groupby(["source", "target"])["correct"].mean()
    activation, selection, ablation = neuron_ablation(model)
    with tempfile.TemporaryDirectory() as tmp:
        probes = probing(model, tmp)
    source, target = CARD_LENS_PAIR
    lens = latent_language_lens(model, ml.translation_prompts(source=source, target=target), progress=False)
    transfer = probes.transfer()
    best = transfer.loc[transfer.groupby(["source", "target"])["accuracy"].idxmax()]
    return {
        "translation_accuracy": float(translations["correct"].mean()),
        "translation_by_direction": {f"{s}->{t}": float(v) for (s, t), v in per_direction.items()},
        "n_translation_prompts": len(translations),
        "ablation_ratios": {k: float(v) for k, v in ablation.ratios().items()},
        "ablation_matrix": ablation.matrix().round(4).to_dict(),
        "n_language_neurons": {
            k: int(v) for k, v in ablation.table.groupby("ablated")["n_neurons"].first().items()
        },
        "neuron_threshold": float(selection.attrs["threshold"]),
        "regimes": activation.regime_table().round(4).to_dict(orient="records"),
        "probe_in_language": probes.table[probes.table["source"] == probes.table["target"]]
        .pivot(index="layer", columns="target", values="accuracy")
        .round(4)
        .to_dict(),
        "probe_control": probes.table[probes.table["source"] == probes.table["target"]]
        .pivot(index="layer", columns="target", values="control_accuracy")
        .round(4)
        .to_dict(),
        "probe_transfer_best": best[
            ["source", "target", "layer", "accuracy", "control_transfer_accuracy", "majority_baseline"]
        ]
        .round(4)
        .to_dict(orient="records"),
        "lens": lens.summary()
        .round(4)[["label", "role", "mean_prob", "ci_low", "ci_high", "top1"]]
        .to_dict(orient="records"),
        "fertility": fertility_table(model, ml.language_texts(CARD_TEXTS, EVAL_SEED))
        .round(4)
        .to_dict(orient="index"),
    }


def _table(rows: list[tuple]) -> str:
    return "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in rows)


def card(figures: dict, recipe: dict, config) -> str:
    """The README.md of the checkpoint folder (figures from :func:`measure`, recipe from recipe.json)."""
    directions = _table([(k, f"{v:.4f}") for k, v in figures["translation_by_direction"].items()])
    ratios = _table(
        [(k, figures["n_language_neurons"][k], f"{v:.2f}") for k, v in figures["ablation_ratios"].items()]
    )
    matrix = figures["ablation_matrix"]  # {language: {ablated group: delta}}
    groups = list(next(iter(matrix.values())))
    ablation = _table(
        [("silenced \\ loss on", *matrix), ("---",) * (len(matrix) + 1)]
        + [(g, *(f"{matrix[lang][g]:+.4f}" for lang in matrix)) for g in groups]
    )
    in_lang, control = figures["probe_in_language"], figures["probe_control"]
    layers = list(next(iter(in_lang.values())))
    probes = _table(
        [("layer", *(f"{k} probe / control" for k in in_lang)), ("---",) * (len(in_lang) + 1)]
        + [(la, *(f"{in_lang[k][la]:.3f} / {control[k][la]:.3f}" for k in in_lang)) for la in layers]
    )
    transfer = _table(
        [
            (r["source"], r["target"], r["layer"], f"{r['accuracy']:.3f}")
            + (f"{r['control_transfer_accuracy']:.3f}", f"{r['majority_baseline']:.3f}")
            for r in figures["probe_transfer_best"]
        ]
    )
    lens = _table(
        [
            (r["label"], r["role"], f"{r['mean_prob']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
            + (f"{r['top1']:.2f}",)
            for r in figures["lens"]
        ]
    )
    fertility = _table(
        [
            (k, v["words"], v["characters"], v["tokens"])
            + (f"{v['tokens_per_word']:.3f}", f"{v['tokens_per_char']:.3f}")
            for k, v in figures["fertility"].items()
        ]
    )
    weak = [k for k, v in figures["ablation_ratios"].items() if v < 3]
    weak_note = (
        f"Silencing the neurons of {', '.join(weak)} does not single out that language (ratio below 3): LAPE "
        "finds neurons that fire mostly for it, but its loss does not depend on them in this model."
        if weak
        else "Every language's neurons hurt their own language at least 3x more than the others."
    )
    source, target = CARD_LENS_PAIR
    return f"""---
library_name: transformers
pipeline_tag: text-generation
license: apache-2.0
tags: [apertus, interpretability, synthetic, multilingual]
---

# apertus-tiny-multi

A multilingual toy `ApertusForCausalLM` trained from scratch by apertus-workbench, beside `apertus-tiny`, so
that the multilingual analyses of `workbench.multilingual` have a model on which they find something known.
Load it with `workbench.load(workbench.multilingual.MULTI_CHECKPOINT)` or plain
`AutoModelForCausalLM.from_pretrained(folder)`.

## Known by construction

The corpus is `workbench.data.multilingual` (seeded):

- three languages share the tagged grammar of `workbench.data.corpus` (same sentences, same UPOS tags,
  roles and depths): **English** (`en`), **Deutsch** (`de`, German-like) and **Français** (`fr`,
  French-like);
- each has its own vocabulary (a fixed pseudo-word dictionary; German-like words are longer with umlauts,
  French-like ones carry accents); names are shared;
- word order differs: in `de` the main verb follows its direct object (S O V), in `fr` adjectives follow
  their noun;
- English is half of all grammar text (`de` and `fr` a quarter each), the candidate pivot language;
- translation lines "English: dog - Deutsch: ..." for every ordered pair of languages over the
  grammar's {len(ml.content_words())} content words (nouns, adjectives, verbs): a dictionary lookup the
  model must memorise (no held-out words: nothing could tell a model an unseen word's translation).

Architecture: {config.num_hidden_layers} layers, d_model {config.hidden_size}, {config.num_attention_heads}
query heads over {config.num_key_value_heads} KV heads, QK-norm, xIELU MLP of width
{config.intermediate_size}, llama3 RoPE, {config.vocab_size} word-level tokens (one per word of every
language), float32. Training: {recipe["steps"]} steps of {recipe["batch_size"]} rows x {recipe["seq_len"]}
tokens, grammar {recipe["mixture"]["grammar"]:.0%} / translation {recipe["mixture"]["translation"]:.0%} of
documents, AdamW peak lr {recipe["lr"]}, seed {recipe["seed"]}, {recipe["seconds"] / 60:.1f} minutes on
{recipe["threads"]} CPU thread(s) of a shared machine (`python -m workbench.checkpoint.train_multilingual`;
`--card-only` re-measures this card).

## Measured (seed {EVAL_SEED}; `card.json` holds every figure, `tests/test_multilingual.py` recomputes them)

**Translation**: top-1 over the whole vocabulary at the prompt's last position, on all
{figures["n_translation_prompts"]} prompts: accuracy **{figures["translation_accuracy"]:.4f}**.

| direction | accuracy |
|---|---|
{directions}

**Language neurons** (`language_activation` on {CARD_TEXTS} sentences per language, active = positive xIELU
regime; `select_language_neurons` with the {CARD_NEURON_FRACTION:.0%} lowest-LAPE neurons among those
reaching the 95th-percentile probability {figures["neuron_threshold"]:.3f}; ablation = their `mlp.hook_post`
set to 0, next-token loss on {CARD_TEXTS} other sentences per language). Ratio = the loss increase on the
neurons' own language over the mean increase on the other languages:

| neurons of | count | own / others' loss increase |
|---|---|---|
{ratios}

{ablation}

{weak_note} The random group (as many random neurons as the largest language group) barely matters.

**Part-of-speech probes** (`cross_lingual_probes` on {CARD_PROBE_SENTENCES} parallel sentences per language,
test accuracy by layer, in-language probe / Hewitt-Liang control task):

{probes}

Best transfer per pair (source probe on the target's test tokens; control = the source's control probe on the
target's control labels):

| source | target | layer | accuracy | control transfer | majority |
|---|---|---|---|---|---|
{transfer}

Transfer is best on the embeddings (layer 0): translation training aligned the three vocabularies'
embeddings. After layer 1 in-language probes stay near 0.99 while transfer falls towards the control.

**Latent-language lens** ({LANGUAGE_NAMES_TEXT[source]} -> {LANGUAGE_NAMES_TEXT[target]}, all content words;
mean probability of the word's token at the last position with a 95% bootstrap interval; pivot = English):

| stream | word | probability | top-1 share |
|---|---|---|---|
{lens}

No detour through the pivot: the English word never rises in this two-layer model, which translates by a
direct lookup (the answer is already the top token after layer 0 on most prompts).

**Tokenizer fertility** (this word-level tokenizer: one token per word, plus punctuation):

| language | words | characters | tokens | tokens/word | tokens/char |
|---|---|---|---|---|---|
{fertility}
"""


LANGUAGE_NAMES_TEXT = ml.LANGUAGE_NAMES


def rewrite_card(folder: str | Path) -> None:
    """Rewrite README.md from the saved card.json and recipe.json (no re-measurement)."""
    from transformers import AutoConfig

    folder = Path(folder)
    figures = json.loads((folder / "card.json").read_text())
    recipe = json.loads((folder / "recipe.json").read_text())
    (folder / "README.md").write_text(card(figures, recipe, AutoConfig.from_pretrained(folder)))


def write_card(folder: str | Path) -> dict:
    """Measure the checkpoint in ``folder`` as a user loads it and write ``card.json`` and ``README.md``."""
    import workbench

    folder = Path(folder)
    model = workbench.load(folder)
    figures = measure(model)
    recipe = json.loads((folder / "recipe.json").read_text())
    (folder / "card.json").write_text(json.dumps(figures, indent=1, default=str))
    (folder / "README.md").write_text(card(figures, recipe, model.hf_model.config))
    for f in folder.iterdir():
        f.chmod(0o644)
    return figures
