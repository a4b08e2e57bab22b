"""Probing: harvest against the transformers forward, batched probes, control tasks, export round trip,
evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import attached_hooks
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score
from transformers import ApertusForTokenClassification

import workbench
from workbench.checkpoint import DEFAULT_CHECKPOINT
from workbench.checkpoint.synthetic import random_apertus
from workbench.checkpoint.tokenizer import build_tokenizer
from workbench.data.alignment import IGNORE, TokenLabelledDataset
from workbench.data.corpus import EVAL_SEED, UPOS_TAGS, tagged_sentences
from workbench.probing import (
    CorruptHarvestError,
    Harvest,
    control_labels,
    evaluate,
    export_probe,
    harvest,
    load_probe_tagger,
    residual_hooks,
    train_probes,
)
from workbench.probing.probes import confusion_frame, rms_normalize, scores
from workbench.widgets.probing import ProbeView, probe_sentence_html

FAST = {"progress": False}


@pytest.fixture(scope="module")
def corpus_model(tmp_path_factory):
    """A random 2-layer Apertus with the embedded checkpoint's word tokenizer, so grammar sentences
    tokenize."""
    folder = tmp_path_factory.mktemp("corpus-apertus")
    tok = build_tokenizer()
    random_apertus(layers=2, d_model=64, heads=4, kv_heads=2, vocab=len(tok), seed=3).save_pretrained(folder)
    tok.save_pretrained(folder)
    return workbench.load(folder)


@pytest.fixture(scope="module")
def pos_data():
    return TokenLabelledDataset.from_tagged(tagged_sentences(160, seed=11), "pos")


@pytest.fixture(scope="module")
def pos_harvest(corpus_model, pos_data, tmp_path_factory):
    encoded = pos_data.encode(corpus_model.tokenizer)
    return encoded, harvest(
        corpus_model, encoded, tmp_path_factory.mktemp("h") / "pos", shard_sentences=64, **FAST
    )


@pytest.fixture(scope="module")
def pos_probes(pos_harvest):
    return train_probes(pos_harvest[1], **FAST)


# ------------------------------------------------------------------------------------------------- harvest
def test_row_shape_is_the_shape_of_the_loaded_rows(pos_harvest):
    _, h = pos_harvest
    data = h.load()
    for key in [*h.hooks, "labels", "position"]:
        assert h.row_shape(key) == tuple(data[key].shape[1:])
    with pytest.raises(CorruptHarvestError, match="has no 'blocks.9.hook_resid_post'"):
        h.row_shape("blocks.9.hook_resid_post")


def test_harvest_is_the_transformers_hidden_states(corpus_model, pos_harvest):
    encoded, h = pos_harvest
    assert h.complete and h.hooks == residual_hooks(2) and h.layers == [0, 1, 2]
    assert len(h.manifest["shards"]) == 3  # 160 sentences in shards of 64
    data = h.load()
    assert data["labels"].shape[0] == encoded.n_labelled == h.n_tokens
    hf = corpus_model.hf_model
    for sentence in (0, 77, 159):
        ids = torch.tensor(encoded.input_ids[sentence])[None]
        with torch.no_grad():
            states = hf(ids, output_hidden_states=True).hidden_states  # the last one is after the final norm
        rows = (data["sentence"] == sentence).nonzero().flatten()
        positions = data["position"][rows]
        assert positions.tolist() == [p for p, lab in enumerate(encoded.labels[sentence]) if lab != IGNORE]
        assert data["labels"][rows].tolist() == [lab for lab in encoded.labels[sentence] if lab != IGNORE]
        for layer, hook in enumerate(h.hooks[:-1]):
            torch.testing.assert_close(data[hook][rows], states[layer][0, positions], atol=2e-5, rtol=1e-5)
        last = hf.model.norm.weight * rms_normalize(data[h.hooks[-1]][rows], corpus_model.cfg.eps)
        torch.testing.assert_close(last, states[-1][0, positions], atol=2e-5, rtol=1e-5)


def test_harvest_stops_after_the_last_needed_layer(corpus_model, pos_data, tmp_path):
    encoded = pos_data[:8].encode(corpus_model.tokenizer)
    later = []
    with corpus_model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda act, hook: later.append(1))]):
        h = harvest(
            corpus_model, encoded, tmp_path / "h", hooks=["blocks.0.mlp.hook_post"], batch_size=4, **FAST
        )
    assert later == [] and attached_hooks(corpus_model) == 0
    assert h.load()["blocks.0.mlp.hook_post"].shape == (encoded.n_labelled, corpus_model.cfg.d_mlp)


def test_harvest_resumes_after_an_interruption(corpus_model, pos_data, tmp_path):
    encoded = pos_data[:40].encode(corpus_model.tokenizer)
    folder = tmp_path / "h"
    full = harvest(corpus_model, encoded, folder, shard_sentences=10, batch_size=4, **FAST).load()

    # Interrupt: the manifest lost its last two shards (as if the run died before writing them).
    manifest = json.loads((folder / "manifest.json").read_text())
    kept = manifest["shards"][:2]
    for shard in manifest["shards"][2:]:
        (folder / shard["file"]).unlink()
    manifest["shards"], manifest["complete"] = kept, False
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="incomplete"):
        Harvest.open(folder).load()
    first_shard = (folder / kept[0]["file"]).stat().st_mtime_ns

    calls = []
    counting = corpus_model.hooks(fwd_hooks=[("hook_embed", lambda act, hook: calls.append(act.shape[0]))])
    with counting, pytest.warns(UserWarning, match="hooks attached"):  # an observer, but it is recorded
        resumed = harvest(corpus_model, encoded, folder, shard_sentences=10, batch_size=4, **FAST)
    assert sum(calls) == 20  # only the 20 sentences of the two missing shards ran
    assert (folder / kept[0]["file"]).stat().st_mtime_ns == first_shard
    again = resumed.load()
    for key, value in full.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0)
    assert not list(folder.glob("*.tmp"))


def test_harvest_refuses_a_folder_of_other_data(corpus_model, pos_data, tmp_path):
    folder = tmp_path / "h"
    harvest(corpus_model, pos_data[:6].encode(corpus_model.tokenizer), folder, **FAST)
    other = pos_data[6:12].encode(corpus_model.tokenizer)
    with pytest.raises(FileExistsError, match="another data"):
        harvest(corpus_model, other, folder, **FAST)
    h = harvest(corpus_model, other, folder, overwrite=True, **FAST)
    assert h.n_tokens == other.n_labelled
    with pytest.raises(KeyError, match="not a hook point"):
        harvest(corpus_model, other, tmp_path / "x", hooks=["blocks.0.hook_resid_postt"], **FAST)
    with pytest.raises(ValueError, match="per head and query"):
        harvest(corpus_model, other, tmp_path / "y", hooks=["blocks.0.attn.hook_pattern"], **FAST)
    assert attached_hooks(corpus_model) == 0


def test_harvest_encodes_a_labelled_dataset_itself(corpus_model, pos_data, tmp_path):
    words = harvest(corpus_model, pos_data[:6], tmp_path / "words", **FAST).load()
    encoded = harvest(
        corpus_model, pos_data[:6].encode(corpus_model.tokenizer), tmp_path / "encoded", **FAST
    ).load()
    assert words.keys() == encoded.keys()
    assert all(torch.equal(words[key], encoded[key]) for key in words)
    with pytest.raises(TypeError, match="TokenLabelledDataset or an EncodedDataset, not list"):
        harvest(corpus_model, ["a text"], tmp_path / "bad", **FAST)
    assert not (tmp_path / "bad").exists()


# -------------------------------------------------------------------------------------------------- probes
def test_probe_table_and_metrics_agree_with_sklearn(pos_probes):
    table = pos_probes.table
    assert list(table.columns[:7]) == [
        "layer",
        "hook",
        "accuracy",
        "macro_f1",
        "control_accuracy",
        "selectivity",
        "majority_baseline",
    ]
    assert table["layer"].tolist() == [0, 1, 2]
    for i, row in table.iterrows():
        predicted = pos_probes.test_predictions[i]
        assert row["accuracy"] == pytest.approx(accuracy_score(pos_probes.test_gold, predicted))
        assert row["macro_f1"] == pytest.approx(macro_f1_by_hand(pos_probes.test_gold, predicted))
        confusion = pos_probes.confusion(int(row["layer"]))
        assert confusion.values.sum() == len(pos_probes.test_gold)
        assert np.trace(confusion.values) / confusion.values.sum() == pytest.approx(row["accuracy"])
    # A random model's embeddings still identify word types, and POS is (nearly) a function of the type here.
    assert table["accuracy"].max() > table["majority_baseline"].iloc[0] + 0.3
    fig = pos_probes.figure()
    assert [trace.name for trace in fig.data] == [
        "probe accuracy",
        "control task accuracy",
        "selectivity",
        "majority baseline",
    ]
    assert pos_probes.confusion_figure(0).data[0].z.shape[0] == len(pos_probes.confusion(0))


def macro_f1_by_hand(gold, predicted) -> float:
    """Macro F1 over the labels that occur in gold or predictions, computed from the counts."""
    gold, predicted = np.asarray(gold), np.asarray(predicted)
    f1s = []
    for label in sorted(set(gold.tolist()) | set(predicted.tolist())):
        hit = np.sum((gold == label) & (predicted == label))
        precision = hit / max(np.sum(predicted == label), 1)
        recall = hit / max(np.sum(gold == label), 1)
        f1s.append(0.0 if hit == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(f1s))


def test_probes_trained_together_equal_probes_trained_alone(pos_harvest):
    h = pos_harvest[1]
    settings = dict(max_steps=40, eval_every=5, patience=1000, **FAST)
    together = train_probes(h, **settings)
    alone = train_probes(h, hooks=[h.hooks[1]], **settings)
    torch.testing.assert_close(alone.weight[0], together.weight[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone.control_bias[0], together.control_bias[1], atol=1e-5, rtol=1e-4)


def test_shuffled_labels_score_at_chance(pos_harvest):
    result = train_probes(pos_harvest[1], shuffle_labels=True, **FAST)
    # With labels unrelated to the tokens, the best a probe can do is the majority label.
    assert (result.table["accuracy"] <= result.table["majority_baseline"] + 0.05).all(), result.table


def test_control_task_maps_each_word_type_to_one_label_with_the_label_distribution():
    gen = torch.Generator().manual_seed(0)
    labels = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), 50_000, replacement=True, generator=gen)
    types = torch.randint(0, 20_000, (50_000,), generator=gen)
    control = control_labels(types, labels, 3, seed=1)
    for t in types[:50].tolist():
        assert control[types == t].unique().numel() == 1
    per_type = torch.zeros(20_000, dtype=torch.long)
    per_type[types] = control
    share = torch.bincount(per_type[types.unique()], minlength=3).double() / types.unique().numel()
    torch.testing.assert_close(share, torch.tensor([0.6, 0.3, 0.1], dtype=torch.double), atol=0.02, rtol=0)


def test_scores_and_confusion_helpers():
    gold, predicted = np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0])
    # Per class: A precision 1/2 recall 1/2, B 1/2 and 1/1, C 1/1 and 1/2 -> F1 1/2, 2/3, 2/3.
    assert scores(gold, predicted) == pytest.approx((0.6, (1 / 2 + 2 / 3 + 2 / 3) / 3))
    frame = confusion_frame(gold, predicted, ["A", "B", "C"])
    assert frame.loc["A", "B"] == 1 and frame.loc["C", "A"] == 1 and frame.values.sum() == 5


# -------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize(("layer", "standalone"), [(0, False), (2, False), (2, True)])
def test_export_reproduces_the_probe_token_for_token(
    corpus_model, pos_harvest, pos_probes, tmp_path, layer, standalone
):
    encoded, h = pos_harvest
    folder = export_probe(pos_probes, layer, tmp_path / "ckpt", corpus_model, standalone=standalone)
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == layer and config["architectures"] == [
        "ApertusForTokenClassification"
    ]
    assert config["id2label"]["0"] == pos_probes.label_names[0] and config["label2id"][
        "PUNCT"
    ] == UPOS_TAGS.index("PUNCT")
    weights = "model.safetensors" if standalone else "probe.safetensors"
    assert sorted(k for k in load_file(folder / weights) if k.startswith("score")) == [
        "score.bias",
        "score.weight",
    ]
    if not standalone:  # the head and the unit norm only: no copy of the model
        assert sorted(load_file(folder / weights)) == ["model.norm.weight", "score.bias", "score.weight"]
        assert config["probe_base_checkpoint"] == str(Path(corpus_model.cfg.model_name).resolve())
        assert not (folder / "model.safetensors").exists()

    data = h.load()
    hook = pos_probes.hooks[pos_probes.index(layer)]
    probe_logits = pos_probes.logits(data[hook], layer)
    classifier = (
        ApertusForTokenClassification.from_pretrained(folder) if standalone else load_probe_tagger(folder)
    ).eval()
    logits = []
    with torch.no_grad():
        for start in range(0, len(encoded), 32):
            batch = encoded.batch(list(range(start, min(start + 32, len(encoded)))))
            out = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits.append(out[batch["labels"] != IGNORE])
    logits = torch.cat(logits)
    assert torch.equal(logits.argmax(-1), probe_logits.argmax(-1))
    torch.testing.assert_close(logits, probe_logits, atol=1e-4, rtol=1e-4)

    # evaluate() on the folder: the same predictions, in the harvest's token order.
    result = evaluate(folder, encoded.dataset, **FAST)
    assert result.predictions["sentence"].tolist() == data["sentence"].tolist()
    assert result.predictions["position"].tolist() == data["position"].tolist()
    expected = [pos_probes.label_names[i] for i in probe_logits.argmax(-1).tolist()]
    assert result.predictions["predicted"].tolist() == expected
    # ... and on the transformers object itself, with the encoded data.
    assert evaluate(classifier, encoded, **FAST).predictions["predicted"].tolist() == expected
    gold = [pos_probes.label_names[i] for i in data["labels"].tolist()]
    assert result.accuracy == pytest.approx(np.mean(np.array(gold) == np.array(expected)))


def test_small_export_in_bf16_is_within_the_stated_tolerance(tmp_path):
    model = workbench.load(dtype=torch.bfloat16)
    encoded = TokenLabelledDataset.from_tagged(tagged_sentences(80, seed=3), "pos").encode(model.tokenizer)
    h = harvest(model, encoded, tmp_path / "h", **FAST)
    probes = train_probes(h, max_steps=100, **FAST)
    features = h.load()
    for layer in (1, 3):
        tagger = load_probe_tagger(export_probe(probes, layer, tmp_path / f"t{layer}", model))
        assert tagger.dtype == torch.bfloat16 and tagger.config.num_hidden_layers == layer
        expected = probes.logits(features[probes.hooks[probes.index(layer)]], layer)
        batch = encoded.batch(list(range(len(encoded))))
        with torch.no_grad():
            logits = tagger(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[batch["labels"] != IGNORE].float()
        bound = 0.02 * (1 + expected.abs().max(-1).values)  # the tolerance the export module states
        assert ((logits - expected).abs().max(-1).values <= bound).all()
        top = expected.topk(2, -1).values
        clear = top[:, 0] - top[:, 1] > 2 * bound
        assert (
            torch.equal(logits.argmax(-1)[clear], expected.argmax(-1)[clear]) and clear.float().mean() > 0.9
        )


def test_export_refuses_what_it_cannot_make_exact(corpus_model, pos_harvest, tmp_path):
    h = pos_harvest[1]
    raw = train_probes(h, normalize=False, max_steps=5, **FAST)
    with pytest.raises(ValueError, match="normalize=True"):
        export_probe(raw, 1, tmp_path / "a", corpus_model)
    other = workbench.HookedApertus(
        random_apertus(layers=2, d_model=64, vocab=corpus_model.cfg.d_vocab, seed=9), corpus_model.tokenizer
    )
    result = train_probes(h, max_steps=5, **FAST)
    with pytest.raises(ValueError, match="another model"):
        export_probe(result, 1, tmp_path / "b", other)
    with pytest.raises(KeyError, match="has no probe"):
        export_probe(result, 7, tmp_path / "c", corpus_model)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(TypeError, match="not a token classifier"):
        evaluate(corpus_model, h and TokenLabelledDataset.from_tagged(tagged_sentences(2), "pos"), **FAST)


def test_export_of_a_non_residual_hook_is_refused(corpus_model, pos_data, tmp_path):
    encoded = pos_data[:30].encode(corpus_model.tokenizer)
    h = harvest(corpus_model, encoded, tmp_path / "h", hooks=["blocks.0.hook_mlp_out"], **FAST)
    result = train_probes(h, max_steps=5, **FAST)
    with pytest.raises(ValueError, match="non-residual"):
        export_probe(result, "blocks.0.hook_mlp_out", tmp_path / "x", corpus_model)


# -------------------------------------------------------------------------------------------------- widget
def test_probe_view_marks_errors_and_reuses_the_forward(corpus_model, pos_harvest, pos_probes):
    encoded = pos_harvest[0]
    view = ProbeView(corpus_model, pos_probes, encoded, sentence=5, layer=1)
    assert view.model_runs == 1
    view.layer.value = pos_probes.hooks[2]
    assert view.model_runs == 1  # another layer: the same forward
    view.sentence.value = 6
    assert view.model_runs == 2
    html = probe_sentence_html(corpus_model, pos_probes, encoded, 6, 2)
    assert view.html.value == html
    ids = torch.tensor(encoded.input_ids[6])[None]
    predicted = pos_probes.run(corpus_model, ids, 2)[0].argmax(-1)
    labels = torch.tensor(encoded.labels[6])
    wrong = int(((predicted != labels) & (labels != IGNORE)).sum())
    assert html.count("line-through") == wrong
    assert f"<b>{int((labels != IGNORE).sum()) - wrong}/{int((labels != IGNORE).sum())}</b>" in html
    with pytest.raises(IndexError, match="out of range"):
        probe_sentence_html(corpus_model, pos_probes, encoded, len(encoded), 2)


# ----------------------------------------------------------------------------------- the embedded checkpoint
@pytest.fixture(scope="module")
def embedded():
    if not (DEFAULT_CHECKPOINT / "model.safetensors").exists():
        pytest.skip(
            f"The embedded checkpoint is not trained yet ({DEFAULT_CHECKPOINT}/model.safetensors missing)."
        )
    return workbench.load()


def test_embedded_model_pos_probe_beats_baseline_and_control(embedded, tmp_path):
    data = TokenLabelledDataset.from_tagged(tagged_sentences(400, seed=EVAL_SEED), "pos")
    h = harvest(embedded, data.encode(embedded.tokenizer), tmp_path / "h", **FAST)
    table = train_probes(h, **FAST).table
    best = table.loc[table["accuracy"].idxmax()]
    assert best["accuracy"] >= best["majority_baseline"] + 0.6, table
    # The embeddings identify each of the few hundred word types, so any word-type labelling (part of speech
    # here, or the control task) reads well at layer 0; after mixing in context, the control task falls and
    # part of speech stays: some layer as accurate as the best (within 0.03) is selective by 0.2 or more.
    strong = table[table["accuracy"] >= best["accuracy"] - 0.03]
    assert strong["selectivity"].max() >= 0.2, table
    shuffled = train_probes(h, shuffle_labels=True, **FAST).table
    assert (shuffled["accuracy"] <= shuffled["majority_baseline"] + 0.05).all(), shuffled
