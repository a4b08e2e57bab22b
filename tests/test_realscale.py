"""The real-scale tier: random Apertus checkpoints with the 131k byte-level BPE, cheap (d_model 64) and at
Apertus-8B's widths (2 layers, bf16)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import workbench
from workbench.data.conllu import read_conllu
from workbench.names import act_name, resid_labels
from workbench.token_text import display_tokens

TEXT = "L'hôpital de Zürich ouvre « demain » 😀"


@pytest.fixture(scope="module")
def bpe_model(bpe_checkpoint):
    return workbench.load(bpe_checkpoint)


def test_bpe_checkpoint_reads_real_text(bpe_checkpoint, bpe_model):
    model = bpe_model
    assert model.cfg.d_vocab == 131072 and model.cfg.d_model == 64
    tokens = model.to_tokens(TEXT)
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id == 1  # prepended: tekken adds no BOS itself
    shown = display_tokens(model.tokenizer, tokens[0])
    assert shown[:3] == ["<s>", "L", "'hôpital"] and "␣Zürich" in shown
    logits = model(tokens)
    assert logits.shape == (1, tokens.shape[1], 131072) and torch.isfinite(logits).all()
    config = json.loads((bpe_checkpoint / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 11)


def test_bpe_checkpoint_encodes_a_treebank(bpe_model):
    model = bpe_model
    data = read_conllu(Path(__file__).parent / "fixtures" / "de_quotes.conllu", "upos")
    encoded = data.encode(model.tokenizer, tokenize="words")
    assert encoded.n_labelled == 22 and encoded.pad_id == 11
    batch = encoded.batch(range(len(encoded)))
    assert model(batch["input_ids"], attention_mask=batch["attention_mask"]).shape[-1] == 131072


# ------------------------------------------------------------------------------------------------------
# Every analysis and widget on the cheap BPE model (131k tekken vocabulary, d_model 64, 2 layers) and real
# multilingual text: an emoji (split into byte pieces), accented words, a CJK sentence.

MULTI = "Grüße aus Zürich! L'hôpital est fermé 😀. 東京に行きました。"
EMOJI = "😀"


@pytest.fixture(scope="module")
def multi_tokens(bpe_model):
    return bpe_model.to_tokens(MULTI)


def split_positions(model, tokens) -> list[int]:
    """Positions of the tokens that hold part of a character (their bytes are not UTF-8 on their own)."""
    from workbench.token_text import token_bytes

    def whole(data: bytes) -> bool:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    return [i for i, data in enumerate(token_bytes(model.tokenizer, tokens[0])) if not whole(data)]


def test_bpe_text_really_splits_the_emoji_into_byte_pieces(bpe_model, multi_tokens):
    from workbench.token_text import token_bytes

    positions = split_positions(bpe_model, multi_tokens)
    # the premise of the display tests: the emoji's four bytes are spread over several tokens
    pieces = token_bytes(bpe_model.tokenizer, multi_tokens[0][positions])
    assert len(positions) >= 2 and EMOJI.encode() in b"".join(pieces)
    raw = bpe_model.to_str_tokens(multi_tokens)
    assert any("\ufffd" in raw[p] for p in positions)  # what to_str_tokens shows: replacement characters


def test_bpe_hooked_forward_and_cache_match_transformers(bpe_model, multi_tokens):
    model = bpe_model
    with torch.no_grad():
        ours = model(multi_tokens)
        theirs = model.hf_model(multi_tokens).logits
        logits, cache = model.run_with_cache(multi_tokens)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, theirs, atol=1e-4, rtol=1e-4)
    final = cache[act_name("resid_post", model.cfg.n_layers - 1)]
    torch.testing.assert_close(model.unembed(model.ln_final(final)), theirs, atol=1e-4, rtol=1e-4)
    pattern = cache[act_name("pattern", 1)]
    n = multi_tokens.shape[1]
    assert pattern.shape == (1, model.cfg.n_heads, n, n)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(1, model.cfg.n_heads, n))
    assert pattern[0, :, 0, 1:].abs().max() == 0  # causal
    # a padded batch: the multilingual row gives the logits it has alone
    tokens, mask = model.tokenize([MULTI, "Hi"])
    with torch.no_grad():
        batch = model(tokens, attention_mask=mask)
    torch.testing.assert_close(batch[0], theirs[0], atol=1e-4, rtol=1e-4)


def test_bpe_attention_explorer_from_text_and_tokens(bpe_model, multi_tokens):
    from workbench.widgets.attention import AttentionExplorer

    model = bpe_model
    n = multi_tokens.shape[1]
    explorer = AttentionExplorer(model, MULTI, layer=1, head=3, window_size=n)
    assert explorer.state["n_tokens"] == n and explorer.state["kv_group"] == 1
    with torch.no_grad():
        _, cache = model.run_with_cache(multi_tokens, names_filter=act_name("pattern", 1))
    expected = cache[act_name("pattern", 1)][0, 3].numpy()
    shown = np.nan_to_num(explorer.pattern)  # the future is NaN on screen
    np.testing.assert_allclose(shown, expected, atol=1e-5)
    # from token ids, [pos] and [1, pos]: the same pattern; the tensor prompt is a new key (one more run)
    from_ids = AttentionExplorer(model, multi_tokens[0], layer=1, head=3, window_size=n)
    np.testing.assert_allclose(np.nan_to_num(from_ids.pattern), expected, atol=1e-5)
    assert from_ids.model_runs == 1 and from_ids.prompt_box.value == model.to_string(multi_tokens[0])
    explorer.run(multi_tokens)
    assert explorer.model_runs == 2
    np.testing.assert_allclose(np.nan_to_num(explorer.pattern), expected, atol=1e-5)


def test_bpe_head_scores_find_a_planted_repeat(bpe_model):
    from workbench.attention import cache_attention, head_scores, score_pattern
    from workbench.token_text import word_token_ids

    model = bpe_model
    words = word_token_ids(model.tokenizer)
    assert len(words) > 10_000  # whole-word tokens of the real vocabulary
    generator = torch.Generator().manual_seed(0)
    half = torch.tensor(words)[torch.randint(len(words), (12,), generator=generator)]
    tokens = torch.cat([torch.tensor([model.tokenizer.bos_token_id]), half, half])
    scores = head_scores(model, tokens, progress=False)
    assert list(scores.index.names) == ["layer", "head"] and len(scores) == 2 * model.cfg.n_heads
    assert scores[["previous_token", "duplicate_token", "induction"]].stack().between(0, 1).all()
    # each score is the pattern's mass on its targets: check one head against its full pattern
    attention = cache_attention(model, tokens)
    from workbench.attention import attention_pattern

    direct = score_pattern(attention_pattern(attention, 1), tokens)
    np.testing.assert_allclose(scores.loc[1][direct.columns].to_numpy(), direct.to_numpy(), atol=1e-5)


def test_bpe_patching_cell_equals_a_hand_patched_run(bpe_model):
    from workbench.patching import PatchingExperiment

    model = bpe_model
    clean, corrupted = "Die Hauptstadt von Frankreich ist", "Die Hauptstadt von Italien ist"
    a, b = model.to_tokens(clean), model.to_tokens(corrupted)
    assert a.shape == b.shape  # equal lengths in the real vocabulary
    answers = (" Paris", " Rom")
    ids = [model.to_single_token(t) for t in answers]  # single tokens of the 131k vocabulary
    exp = PatchingExperiment(model, clean, corrupted, answers=answers)
    result = exp.run("resid_pre", "logit_diff", progress=False)
    grid = result.grid()
    assert grid.shape == (model.cfg.n_layers, a.shape[1])
    assert grid[0, 0] == pytest.approx(0.0, abs=1e-6)  # BOS is the same in both runs
    changed = int((a != b).nonzero()[0, 1])
    assert grid[0, changed] == pytest.approx(1.0, abs=1e-4)  # the only differing token restores all

    layer, pos = 1, changed
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(a, names_filter=act_name("resid_pre", layer))
        source = clean_cache[act_name("resid_pre", layer)]

        def put(act, hook):
            act[:, pos] = source[:, pos]
            return act

        def diff(logits):
            return float(logits[0, -1, ids[0]] - logits[0, -1, ids[1]])

        patched = diff(model.run_with_hooks(b, fwd_hooks=[(act_name("resid_pre", layer), put)]))
        base, top = diff(model(b)), diff(model(a))
    assert result.raw[result.cells.index((layer, pos))] == pytest.approx(patched, abs=1e-4)
    assert (result.clean_value, result.corrupted_value) == pytest.approx((top, base), abs=1e-4)
    assert float(grid[layer, pos]) == pytest.approx((patched - base) / (top - base), abs=1e-3)
    table = result.table
    assert len(table) == model.cfg.n_layers * a.shape[1]
    assert table.token.iloc[1] == model.token_labels(a[0])[1]

    from workbench.widgets.patching import PatchingView

    view = PatchingView(exp)  # the same sweep, cached by the view; a cell shows its patched predictions
    assert view.result.grid().equal(grid)
    predictions = view.select((layer, pos))
    with torch.no_grad():
        hand = model.run_with_hooks(b, fwd_hooks=[(act_name("resid_pre", layer), put)])[0, -1]
    assert predictions.patched.iloc[0] == model.token_labels([int(hand.argmax())])[0]


def test_bpe_probe_harvest_train_export_reload(bpe_model, tmp_path):
    import warnings

    from workbench.data.alignment import IGNORE, AlignmentWarning
    from workbench.probing import export_probe, harvest, load_probe_tagger, train_probes

    model = bpe_model
    data = read_conllu(Path(__file__).parent / "fixtures" / "en_punctuation.conllu", "upos")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlignmentWarning)
        encoded = data.encode(model.tokenizer)
    assert encoded.n_labelled == 34 - 3  # the words the hand count (test_alignment_bpe) leaves labelled
    h = harvest(model, encoded, tmp_path / "harvest", progress=False)
    assert h.complete and h.n_tokens == encoded.n_labelled
    result = train_probes(h, max_steps=40, progress=False)
    table = result.table
    assert len(table) == model.cfg.n_layers + 1 and table.accuracy.between(0, 1).all()
    # the harvested features are the model's own residual streams at the labelled tokens
    features = h.load()
    batch = encoded.batch(list(range(len(encoded))))
    with torch.no_grad():
        _, cache = model.run_with_cache(batch["input_ids"], attention_mask=batch["attention_mask"])
    labelled = batch["labels"] != IGNORE
    last = act_name("resid_post", model.cfg.n_layers - 1)
    torch.testing.assert_close(features[last], cache[last][labelled], atol=1e-4, rtol=1e-4)

    layer = model.cfg.n_layers
    folder = export_probe(result, layer, tmp_path / "probe", model)
    assert not (folder / "model.safetensors").exists()  # the head only, on top of the base checkpoint
    tagger = load_probe_tagger(folder)
    with torch.no_grad():
        out = tagger(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    probe_logits = result.logits(features[last], layer)
    torch.testing.assert_close(out[labelled], probe_logits, atol=1e-4, rtol=1e-4)
    assert (out[labelled].argmax(-1) == result.predict(features[last], layer)).all()

    from workbench.widgets.probing import ProbeView

    view = ProbeView(model, result, encoded, sentence=2, layer=layer)
    assert view.model_runs == 1 and "<span" in view.html.value


def test_bpe_lens_table_trajectory_and_dla(bpe_model, multi_tokens):
    from workbench import lens

    model = bpe_model
    with torch.no_grad():
        logits = model(multi_tokens)[0]
    table = lens.logit_lens_table(model, MULTI, k=3)
    n = multi_tokens.shape[1]
    assert len(table) == (model.cfg.n_layers + 1) * n * 3
    final = table[(table.layer == "final_post") & (table["rank"] == 0)].sort_values("position")
    assert final.token_id.tolist() == logits.argmax(-1).tolist()  # the last lens row is the model's output
    np.testing.assert_allclose(final.logit.to_numpy(), logits.max(-1).values.numpy(), atol=1e-4)
    assert table.prob.between(0, 1).all()

    target = model.to_single_token(" Paris")
    trajectory = lens.target_trajectory(model, MULTI, target, position=5)
    assert trajectory.layer.tolist() == resid_labels(model.cfg.n_layers)
    last = trajectory.iloc[-1]
    assert last.logit == pytest.approx(float(logits[5, target]), abs=1e-4)
    assert last["rank"] == int((logits[5] > logits[5, target]).sum())
    assert last.prob == pytest.approx(float(logits[5].softmax(-1)[target]), rel=1e-3)

    wrong = model.to_single_token(" Rom")
    dla = lens.direct_logit_attribution(model, MULTI, " Paris", " Rom")
    direct = float(logits[-1, target] - logits[-1, wrong])
    assert dla.attrs["total"] == pytest.approx(direct, abs=1e-4)
    assert dla.attribution.sum() == pytest.approx(direct, abs=1e-3)
    assert len(dla) == 1 + model.cfg.n_layers * (model.cfg.n_heads + 1)

    from workbench.widgets.lens import LensExplorer

    explorer = LensExplorer(model, MULTI, answer=" Paris", wrong=" Rom", k=2)
    assert explorer.table.attrs["total"] == pytest.approx(direct, abs=1e-4)
    assert len(explorer.lens.data) == 1 and "sum to" in explorer.status.value


def test_bpe_xielu_statistics_and_explorer(bpe_model):
    from workbench.widgets.xielu import XIELUExplorer
    from workbench.xielu import neuron_output_tokens, xielu_statistics

    model = bpe_model
    prompts = [MULTI, "Ein kurzer Satz über Käse.", "Un café crème, s'il vous plaît."]
    stats = xielu_statistics(model, prompts, batch_size=2, top_k=3, progress=False)
    tokens, mask = model.tokenize(prompts)
    assert stats.n_tokens == int(mask.sum()) - len(prompts)  # BOS left out
    counts = stats.counts.sum((1, 2))
    assert (counts == stats.n_tokens * model.cfg.d_mlp).all()
    np.testing.assert_allclose(stats.regime_shares().sum(1), 1.0)
    # the top example of a neuron is the largest pre-activation of the data, found directly
    layer, neuron = 1, 5
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=act_name("pre", layer))
    pre = cache[act_name("pre", layer)][..., neuron]
    valid = mask.bool().clone()
    valid[:, 0] = False
    assert stats.top_values[layer, neuron, 0] == pytest.approx(float(pre[valid].max()), abs=1e-5)
    assert stats.bottom_values[layer, neuron, 0] == pytest.approx(float(pre[valid].min()), abs=1e-5)
    example = stats.examples(layer, neuron, "top").iloc[0]
    prompt, pos = int(example.prompt), int(example.position)
    assert float(pre[prompt, pos]) == pytest.approx(example.value, abs=1e-5)

    outputs = neuron_output_tokens(model, layer, neuron, k=3)
    direction = model.blocks[layer].mlp.W_out[neuron] * model.ln_final.w
    scores = direction @ model.W_U
    assert outputs[outputs.kind == "promoted"].token_id.tolist() == scores.topk(3).indices.tolist()

    explorer = XIELUExplorer(model, stats, layer=0, neuron=2)
    explorer.show(layer=layer, neuron=neuron)
    assert f"Layer {layer}, neuron {neuron}" in explorer.neuron_panel.value
    assert len(explorer.curve.data) >= 1


def test_bpe_token_labels_are_readable(bpe_model, multi_tokens):
    from workbench.token_text import escape_label

    model = bpe_model
    labels = model.token_labels(multi_tokens)
    assert labels == display_tokens(model.tokenizer, multi_tokens[0])
    assert not any("\ufffd" in label for label in labels)
    positions = split_positions(model, multi_tokens)
    assert all("<0x" in labels[p] for p in positions)  # the emoji's bytes, shown as bytes
    assert labels[0] == "<s>" and escape_label(labels[0]) == "&lt;s&gt;"
    assert "␣Zürich" in labels and "␣aus" in labels  # a leading space is visible
    assert "東京" in "".join(labels)


def _explorer_labels(model, tokens) -> list[str]:
    from workbench.widgets.attention import AttentionExplorer

    explorer = AttentionExplorer(model, tokens[0], window_size=tokens.shape[1])
    return list(explorer.figure.layout.xaxis.ticktext)


def test_bpe_views_show_token_labels(bpe_model, multi_tokens):
    from workbench import figures, lens

    model = bpe_model
    expected = model.token_labels(multi_tokens)
    # The explorer numbers its axis labels ("3: ␣aus") and escapes them for plotly ("0: &lt;s&gt;").
    assert _explorer_labels(model, multi_tokens) == figures.token_labels(expected)
    table = lens.logit_lens_table(model, multi_tokens, k=1)
    assert table.drop_duplicates("position").input_token.tolist() == expected


@pytest.mark.slow
def test_realdim_checkpoint_has_apertus_8b_widths(realdim_checkpoint):
    size = sum(f.stat().st_size for f in realdim_checkpoint.glob("*.safetensors"))
    assert 2.9e9 < size < 3.1e9  # 1.51 billion bf16 parameters
    model = workbench.load(realdim_checkpoint, dtype="bfloat16")
    cfg = model.cfg
    assert (
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
        cfg.n_key_value_heads,
        cfg.d_head,
        cfg.d_mlp,
        cfg.d_vocab,
    ) == (
        2,
        4096,
        32,
        8,
        128,
        21504,
        131072,
    )
    assert model.W_E.dtype == torch.bfloat16
    tokens = model.to_tokens(TEXT)
    with torch.inference_mode():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("mlp.hook_post"))
    assert logits.shape == (1, tokens.shape[1], 131072) and torch.isfinite(logits.float()).all()
    assert cache["blocks.1.mlp.hook_post"].shape == (1, tokens.shape[1], 21504)
