"""The multilingual corpus, the apertus-tiny-multi checkpoint and the analyses of workbench.multilingual."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import workbench
from workbench.checkpoint import multilingual_card as mc
from workbench.checkpoint.train_multilingual import MULTI_CHECKPOINT
from workbench.data import multilingual as ml
from workbench.data.alignment import TokenLabelledDataset
from workbench.data.conllu import read_conllu
from workbench.multilingual import (
    ablate_neurons,
    cross_lingual_probes,
    fertility_table,
    language_activation,
    lape,
    latent_language_lens,
    neurons_by_language,
    select_language_neurons,
)
from workbench.multilingual.engine import ln_final, resid_names, unembed

FIXTURES = Path(__file__).parent / "fixtures"

# Thresholds the card's figures must meet (the card states the measured values; see card.json).
MIN_TRANSLATION_ACCURACY = 0.9
MIN_ABLATION_RATIO = 3.0


@pytest.fixture(scope="module")
def multi():
    return workbench.load(MULTI_CHECKPOINT)


@pytest.fixture(scope="module")
def card():
    return json.loads((MULTI_CHECKPOINT / "card.json").read_text())


# ------------------------------------------------------------------------------------------ the corpus
def test_languages_share_labels_but_not_words_and_reorder():
    tagged = ml.multilingual_tagged(200, seed=3)
    en, de, fr = tagged["en"], tagged["de"], tagged["fr"]
    for e, d, f in zip(en, de, fr):
        # Same multiset of labels (the same sentence), words of each language's own vocabulary.
        assert sorted(e.pos) == sorted(d.pos) == sorted(f.pos)
        assert len(e) == len(d) == len(f)
    own = {k: {w.lower() for s in v for w, p in zip(s.words, s.pos) if p not in ("PROPN", "PUNCT")}
           for k, v in tagged.items()}  # fmt: skip
    assert not own["en"] & own["de"] and not own["en"] & own["fr"] and not own["de"] & own["fr"]
    # French-like: no adjective directly before a noun; English has many.
    adj_noun = {
        k: sum(a == "ADJ" and b == "NOUN" for s in v for a, b in zip(s.pos, s.pos[1:]))
        for k, v in tagged.items()
    }
    assert adj_noun["en"] > 20 and adj_noun["fr"] == 0 and adj_noun["de"] == adj_noun["en"]
    # German-like: the main verb of a transitive clause follows its object.
    for d in de:
        verb = [
            i
            for i, (p, r, z) in enumerate(zip(d.pos, d.roles, d.depths))
            if p == "VERB" and r == "OTHER" and z == 1
        ]
        objects = [i for i, r in enumerate(d.roles) if r == "OBJ"]
        if objects:
            assert verb[0] == objects[-1] + 1
    assert any(e.roles.index("OBJ") > e.pos.index("VERB") for e in en if "OBJ" in e.roles)


def test_translation_prompts_and_dictionary_are_fixed():
    prompts = ml.translation_prompts()
    assert len(prompts) == 6 * len(ml.content_words())
    p = ml.translation_prompts(source="en", target="de", words=["dog"])[0]
    assert p.prompt == "English: dog - Deutsch:" and p.answer == " " + ml.dictionary("de")["dog"]
    # The dictionary is a function of the word alone: the same on every machine and run.
    assert ml.dictionary("de")["dog"] == "krölschöchen" and ml.dictionary("fr")["dog"] == "naifoais"
    for language in ml.LANGUAGES:
        values = list(ml.dictionary(language).values())
        assert len(set(values)) == len(values)
    with pytest.raises(ValueError, match="Unknown language"):
        ml.translation_prompts(source="xx")
    with pytest.raises(KeyError, match="content_words"):
        ml.translation_prompts(words=["unicorn"])


def test_checkpoint_vocabulary_covers_the_corpus(multi):
    docs = list(itertools.islice(ml.training_documents(seed=1), 300))
    ids = multi.tokenizer(docs, add_special_tokens=False)["input_ids"]
    assert multi.tokenizer.unk_token_id not in {i for row in ids for i in row}


# ------------------------------------------------------------------------------------ the checkpoint
def test_translation_task_is_solved(multi, card):
    table = mc.translation_table(multi)
    accuracy = table["correct"].mean()
    assert accuracy == pytest.approx(card["translation_accuracy"], abs=0.005)
    assert accuracy >= MIN_TRANSLATION_ACCURACY
    assert table.groupby(["source", "target"])["correct"].mean().min() >= MIN_TRANSLATION_ACCURACY - 0.1


def test_language_neuron_ablation_hurts_its_own_language(multi, card):
    activation, selection, ablation = mc.neuron_ablation(multi)
    ratios = ablation.ratios()
    for language in ml.LANGUAGES:
        assert ratios[language] == pytest.approx(card["ablation_ratios"][language], rel=0.02, abs=0.05)
    # Silencing the neurons LAPE assigns to a language hurts that language far more than the others: in the
    # card, French-like and English; the German-like group is small and matters little (stated there).
    assert ratios.max() >= 10 * MIN_ABLATION_RATIO / 3
    assert (ratios >= MIN_ABLATION_RATIO).sum() >= 2, ablation.matrix()
    # A random group of the same size barely matters.
    m = ablation.matrix()
    strongest = ratios.idxmax()
    assert m.loc["random"].max() < m.loc[strongest, strongest] / 5


def test_cross_lingual_transfer_beats_the_control_task(multi, tmp_path):
    probes = mc.probing(multi, tmp_path, n=120)
    transfer = probes.transfer()
    best = transfer.groupby(["source", "target"])["above_control"].max()
    assert (best > 0.1).all(), transfer
    # The in-language probes are the diagonal and match train_probes' own test accuracy.
    own = probes.table[probes.table["source"] == probes.table["target"]]
    table = probes.probes["de"].table.set_index("hook")["accuracy"]
    np.testing.assert_allclose(
        own[own["target"] == "de"].set_index("hook")["accuracy"], table[own[own["target"] == "de"]["hook"]]
    )


# ------------------------------------------------------------------------------- exactness and LAPE
def test_latent_lens_equals_a_direct_computation(multi):
    prompts = ml.translation_prompts(6, seed=1)
    lens = latent_language_lens(multi, prompts, batch_size=4, progress=False)
    names = resid_names(multi.cfg.n_layers)
    for i, p in enumerate(prompts):
        _, cache = multi.run_with_cache(p.prompt, names_filter=names)
        for stream, name in enumerate(names):
            probs = unembed(multi, ln_final(multi, cache[name][0, -1])).float().softmax(-1)
            for role, language in (("target", p.target), ("source", p.source), ("pivot", "en")):
                token = multi.to_single_token(" " + p.words[language])
                t = lens.table
                row = t[(t["prompt_index"] == i) & (t["stream"] == stream) & (t["role"] == role)].iloc[0]
                assert row["prob"] == pytest.approx(float(probs[token]), rel=1e-4, abs=1e-7)
                assert row["rank"] == int((probs > probs[token]).sum())
    # The last stream is the model's own output distribution.
    logits = multi(prompts[0].prompt)[0, -1].float().softmax(-1)
    last = lens.table.query("prompt_index == 0 and stream == @multi.cfg.n_layers and role == 'target'").iloc[
        0
    ]
    assert last["prob"] == pytest.approx(float(logits[last["token_id"]]), rel=1e-4)
    summary = lens.summary()
    assert (
        set(summary["role"]) == {"target", "source", "pivot"}
        and (summary["ci_low"] <= summary["mean_prob"]).all()
    )
    assert len(lens.figure().data) == 6


def test_lape_finds_planted_language_neurons():
    rng = np.random.default_rng(0)
    languages = ["en", "de", "fr", "it"]
    n = 400
    # A synthetic activation table: every neuron fires with a similar probability in every language...
    p = np.clip(rng.uniform(0.2, 0.6, size=(n, 1)) + rng.normal(0, 0.03, size=(n, 4)), 0, 1)
    planted = {"de": [3, 77, 150], "fr": [10, 220], "it": [399]}
    for language, neurons in planted.items():
        for i in neurons:  # ...except planted ones, active almost only in their language
            p[i] = 0.01
            p[i, languages.index(language)] = 0.9
    table = pd.DataFrame(p, columns=languages, index=pd.MultiIndex.from_product([[0], range(n)]))
    entropy = lape(table)
    assert entropy.idxmin()[1] in sum(planted.values(), [])
    assert entropy.max() <= np.log(4) + 1e-9
    selection = select_language_neurons(table, fraction=6 / n)
    found = {k: sorted(i for _, i in v) for k, v in neurons_by_language(selection).items()}
    assert found == {k: sorted(v) for k, v in planted.items()}
    # A neuron never active has no distribution.
    table.iloc[0] = 0.0
    assert np.isnan(lape(table).iloc[0])


def test_language_activation_counts_every_token_once(multi):
    texts = {
        "en": ["The dog saw a cat.", "I slept."],
        "de": [ml.translate_sentence(ml.multilingual_tagged(1, 5)["en"][0], "de").text],
    }
    activation = language_activation(multi, texts, progress=False)
    # Every real token except BOS, in exactly one regime per neuron.
    per_token = activation.counts.sum(0)  # [language, layer, neuron]
    for k, language in enumerate(texts):
        assert (per_token[k] == activation.n_tokens[language]).all()
    assert activation.n_tokens["en"] == sum(len(multi.to_tokens(t)[0]) - 1 for t in texts["en"])
    probs = activation.probabilities("negative rising")
    assert (
        probs.shape == (multi.cfg.n_layers * multi.cfg.d_mlp, 2) and ((probs >= 0) & (probs <= 1)).all().all()
    )


# ------------------------------------------------------- a random checkpoint with the real 131k BPE
@pytest.fixture(scope="module")
def bpe_model(request):
    try:
        folder = request.getfixturevalue("bpe_checkpoint")
    except pytest.FixtureLookupError:
        pytest.skip(
            "the bpe_checkpoint fixture (tests/conftest.py, data engineer's branch) is not merged yet"
        )
    return workbench.load(folder)


def test_every_analysis_runs_with_a_real_bpe_tokenizer(bpe_model, tmp_path):
    # Three small treebanks (en, de, fr) with multiword tokens ("doesn't", "zum", "du") and SpaceAfter=No.
    files = {path.stem: path for path in sorted((FIXTURES / "multilingual").glob("*.conllu"))}
    assert set(files) == {"en", "de", "fr"}
    datasets = {k: read_conllu(p, "upos") for k, p in files.items()}
    # Fixtures are a few sentences each: repeat them so that every probe split has sentences.
    datasets = {k: TokenLabelledDataset(d.sentences * 6, d.label_names, d.name) for k, d in datasets.items()}
    probes = cross_lingual_probes(bpe_model, datasets, tmp_path, progress=False, max_steps=20)
    assert set(probes.table["source"]) == set(files) and probes.table["accuracy"].between(0, 1).all()
    probes.figure()

    # Fertility counts surface words: the multiword token "zum" is one word, not "zu dem".
    others = {p.stem: p for p in FIXTURES.glob("??_*.conllu")}  # the data engineer's treebanks, if present
    fertility = fertility_table(bpe_model, {**files, **others})
    syntactic_words = sum(len(s) for s in datasets["de"].sentences) // 6
    assert fertility.loc["de", "words"] == syntactic_words - 2  # "im" and "zum" count once each
    # Space-separated languages cost at least a token per word; Japanese (no spaces) may pack words together.
    assert (fertility.loc[["en", "de", "fr"], "tokens_per_word"] >= 1).all() and (
        fertility["tokens"] > 0
    ).all()
    # Byte-level BPE splits the German-like pseudo-words into several pieces; English words are mostly one.
    synthetic = fertility_table(bpe_model, ml.language_texts(50))
    assert synthetic.loc["de", "tokens_per_word"] > synthetic.loc["en", "tokens_per_word"]

    texts = {k: [s.text for s in d.sentences[:4]] for k, d in datasets.items()}
    activation = language_activation(bpe_model, texts, progress=False)
    selection = activation.select(fraction=0.02)
    groups = neurons_by_language(selection)
    ablation = ablate_neurons(bpe_model, groups, texts, progress=False)
    assert set(ablation.table["language"]) == set(texts)
    activation.figure()

    prompts = [
        {"prompt": "Français: fleur - Deutsch:", "target": "Blume", "source": "fleur", "pivot": "flower"},
        {"prompt": "Deutsch: Hund - Français:", "target": "chien", "source": "Hund", "pivot": "dog"},
    ]
    lens = latent_language_lens(bpe_model, prompts, progress=False)
    assert len(lens.table) == 2 * (bpe_model.cfg.n_layers + 1) * 3
    lens.figure()


def _texts(path: Path) -> list[str]:
    return [
        line.removeprefix("# text = ") for line in path.read_text().splitlines() if line.startswith("# text")
    ]


def test_random_word_checkpoint_runs_every_analysis(random_model, tmp_path):
    # The shared random fixture's words are w0, w1, ...: every analysis only needs texts and labels.
    words = [f"w{i}" for i in range(40)]
    rng = np.random.default_rng(0)
    texts = {k: [" ".join(rng.choice(words[j::2], 6)) for _ in range(8)] for j, k in enumerate(["a", "b"])}
    activation = language_activation(random_model, texts, progress=False)
    assert len(activation.top_neurons("a", 5)) == 5
    assert not ablate_neurons(random_model, {"a": [(0, 1), (1, 2)]}, texts, progress=False).table.empty
