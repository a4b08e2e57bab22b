"""Attention patterns from cached queries/keys, head scores, and the explorer's view logic (no browser)."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
import torch
from conftest import attached_hooks
from transformer_lens import head_detector

import workbench
from workbench import HookedApertus
from workbench.attention import (
    SCORES,
    attention_pattern,
    attention_window,
    cache_attention,
    detection_patterns,
    head_scores,
    head_scores_figure,
    kv_group,
    score_pattern,
    top_keys,
)
from workbench.checkpoint import DEFAULT_CHECKPOINT
from workbench.checkpoint.synthetic import random_apertus
from workbench.widgets.attention import AttentionExplorer, HeadSummary

TOL = 1e-5
PROMPT = "w1 w2 w3 w4 w5 w1 w2 w3 w4 w5 w6 w7"


def reference_patterns(model, prompt):
    """Every layer's pattern as the model's own explicit attention computes it (hook_pattern)."""
    _, cache = model.run_with_cache(prompt, names_filter=lambda n: n.endswith("hook_pattern"))
    return [cache[f"blocks.{layer}.attn.hook_pattern"][0] for layer in range(model.cfg.n_layers)]


def cells(z) -> np.ndarray:
    """A heatmap's cells as numbers, blank (None) cells as 0."""
    return np.nan_to_num(np.asarray(z, dtype=float))


class ForwardCounter:
    """Counts forward passes (embedding calls) with a plain torch hook, outside TransformerLens's hooks."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.hf_model.model.embed_tokens.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


# ------------------------------------------------------------------------------------------------ patterns
def test_pattern_from_cached_queries_and_keys_equals_hook_pattern(random_model):
    attention = cache_attention(random_model, PROMPT)
    for layer, reference in enumerate(reference_patterns(random_model, PROMPT)):
        assert (attention_pattern(attention, layer) - reference).abs().max() <= TOL
        window = attention_pattern(attention, layer, heads=[3, 1], queries=slice(4, 9), keys=range(2, 7))
        assert window.shape == (2, 5, 5)
        assert (window - reference[[3, 1], 4:9, 2:7]).abs().max() <= TOL
        one = attention_pattern(attention, layer, heads=2, queries=range(10, 13))
        assert one.shape == (3, 13) and (one - reference[2, 10:13]).abs().max() <= TOL
    assert attached_hooks(random_model) == 0


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 1), (4, 4), (6, 2), (6, 3)])
def test_grouped_query_heads_read_their_kv_group(heads, kv_heads):
    model = HookedApertus(
        random_apertus(layers=1, heads=heads, kv_heads=kv_heads, d_model=48, seed=heads + kv_heads), None
    )
    tokens = torch.randint(4, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    attention = cache_attention(model, tokens)
    reference = reference_patterns(model, tokens)[0]
    assert (attention_pattern(attention, 0) - reference).abs().max() <= TOL
    groups = [kv_group(h, heads, kv_heads) for h in range(heads)]
    assert groups == sorted(groups) and len(set(groups)) == kv_heads and groups.count(0) == heads // kv_heads
    with pytest.raises(IndexError, match=f"0..{heads - 1}"):
        kv_group(heads, heads, kv_heads)


def test_caching_a_prompt_computes_no_pattern(random_model, monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    attention = cache_attention(random_model, PROMPT)
    cfg = random_model.cfg
    assert len(calls) == cfg.n_layers  # every layer ran fused attention: no explicit pattern anywhere
    n = attention.n_tokens
    assert [tuple(q.shape) for q in attention.queries] == [(n, cfg.n_heads, cfg.d_head)] * cfg.n_layers
    assert [tuple(k.shape) for k in attention.keys] == [(n, cfg.n_key_value_heads, cfg.d_head)] * cfg.n_layers


def test_bad_windows_and_layers_get_clear_errors(random_model):
    attention = cache_attention(random_model, PROMPT)
    with pytest.raises(IndexError, match=r"3 layers \(0..2\)"):
        attention_pattern(attention, 3)
    with pytest.raises(IndexError, match="outside the prompt"):
        attention_pattern(attention, 0, queries=range(5, 40))
    with pytest.raises(ValueError, match="contiguous"):
        attention_pattern(attention, 0, queries=slice(0, 10, 2))
    with pytest.raises(ValueError, match="one prompt"):
        cache_attention(random_model, torch.zeros(2, 5, dtype=torch.long))


@pytest.fixture(scope="module")
def embedded_model():
    if not (DEFAULT_CHECKPOINT / "model.safetensors").exists():
        pytest.skip(
            f"The embedded checkpoint is not trained yet ({DEFAULT_CHECKPOINT}/model.safetensors missing)."
        )
    return workbench.load()


def test_a_4096_token_prompt_keeps_memory_to_what_is_shown(embedded_model):
    torch.manual_seed(0)
    cfg = embedded_model.cfg
    tokens = torch.randint(4, cfg.d_vocab, (cfg.n_ctx,))  # ids 0..3 are the special tokens
    tokens[0] = embedded_model.tokenizer.bos_token_id
    attention = cache_attention(embedded_model, tokens)
    stored = sum(t.numel() for t in (*attention.queries, *attention.keys))
    assert stored == cfg.n_layers * cfg.n_ctx * (cfg.n_heads + cfg.n_key_value_heads) * cfg.d_head
    window = attention_pattern(attention, cfg.n_layers - 1, queries=range(4000, 4064), keys=range(4000, 4064))
    assert window.shape == (cfg.n_heads, 64, 64)
    rows = attention_pattern(attention, cfg.n_layers - 1, queries=range(4090, 4096))
    assert torch.allclose(rows.sum(-1), torch.ones(cfg.n_heads, 6), atol=1e-5)

    with ForwardCounter(embedded_model) as forwards:
        explorer = AttentionExplorer(embedded_model, window_size=48)
        explorer.run(tokens)
        explorer.window.value = 4000
        explorer.layer.value = 1
    assert forwards.calls == 1
    assert np.asarray(explorer.figure.data[0].z, dtype=float).shape == (48, 49)  # BOS is always drawn
    assert list(explorer.figure.data[0].x) == [0, *range(4000, 4048)]


# --------------------------------------------------------------------------------------------- head scores
def test_detection_patterns_are_transformer_lens_ones():
    tokens = torch.tensor([1, 7, 8, 9, 7, 8, 9, 7, 5, 5])
    ours = detection_patterns(tokens)
    expected = {
        "previous_token": head_detector.get_previous_token_head_detection_pattern(tokens[None]),
        "duplicate_token": head_detector.get_duplicate_token_head_detection_pattern(tokens[None]),
        "induction": head_detector.get_induction_head_detection_pattern(tokens[None]),
    }
    for name in SCORES:
        assert torch.equal(ours[name].float(), expected[name]), name
    rows = detection_patterns(tokens, range(4, 8))
    assert all(torch.equal(rows[name], ours[name][4:8]) for name in SCORES)


def hand_built(tokens: list[int], length: int) -> dict[str, torch.Tensor]:
    """Ideal heads on BOS + a sequence of `length` distinct tokens repeated: each row all on one key (itself
    where the head has no target)."""
    n = len(tokens)
    targets = {
        "previous_token": [max(i - 1, 0) for i in range(n)],
        "duplicate_token": [i - length if i > length else i for i in range(n)],
        "induction": [i - length + 1 if i > length else i for i in range(n)],
    }
    return {name: torch.eye(n)[keys] for name, keys in targets.items()}


def test_scores_of_hand_built_heads_are_known():
    length = 5
    tokens = torch.tensor([1, *range(10, 10 + length), *range(10, 10 + length)])
    ideal = hand_built(tokens.tolist(), length)
    pattern = torch.stack([ideal["previous_token"], ideal["duplicate_token"], ideal["induction"]])
    half = 0.5 * ideal["induction"] + 0.5 * ideal["previous_token"]
    table = score_pattern(torch.cat([pattern, half[None]]), tokens)
    expected = np.array(
        [
            [1.0, 0.0, 0.0],  # previous-token head: the induction target is i-L+1, never i-1 for L > 2
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0],
            [0.5, 0.0, 0.5],
        ]
    )
    np.testing.assert_allclose(table[list(SCORES)].to_numpy(), expected, atol=1e-12)
    no_repeat = score_pattern(ideal["previous_token"][:6, :6], tokens[:6])
    assert no_repeat["previous_token"].item() == 1.0 and np.isnan(no_repeat["induction"].item())


def test_scores_relate_to_transformer_lens_detect_head_scores(random_model):
    text = "w3 w9 w4 w12 w7 w3 w9 w4 w12 w7 w3"
    tokens = random_model.to_tokens(text)[0]
    ours = head_scores(random_model, text, progress=False)
    _, cache = random_model.run_with_cache(text, remove_batch_dim=True)
    n = len(tokens)
    for name, head_name in zip(SCORES, ["previous_token_head", "duplicate_token_head", "induction_head"]):
        theirs = head_detector.detect_head(random_model, text, head_name, cache=cache)
        with_target = int(detection_patterns(tokens)[name].any(-1).sum())
        np.testing.assert_allclose(
            ours[name].unstack("head").to_numpy() * with_target / n, theirs.numpy(), atol=1e-5
        )
    assert attached_hooks(random_model) == 0


def test_head_scores_in_chunks_and_batches_equal_scoring_full_patterns(random_model):
    texts = ["w1 w2 w3 w4 w1 w2 w3 w4", "w9 w8 w7 w6 w9 w8 w7 w6"]
    tokens = random_model.to_tokens(texts)
    whole = head_scores(random_model, tokens, chunk=1000, progress=False)
    chunked = head_scores(random_model, tokens, chunk=3, progress=False)
    np.testing.assert_allclose(whole[list(SCORES)].to_numpy(), chunked[list(SCORES)].to_numpy(), atol=1e-9)
    # Two prompts of the same structure pool their positions: the mean of their per-prompt scores.
    per_prompt = []
    for row in tokens:
        patterns = reference_patterns(random_model, row[None])
        per_prompt.append(np.stack([score_pattern(p, row)[list(SCORES)].to_numpy() for p in patterns]))
    expected = np.mean(per_prompt, axis=0).reshape(-1, len(SCORES))
    np.testing.assert_allclose(whole[list(SCORES)].to_numpy(), expected, atol=1e-5)
    assert list(whole["kv_group"]) == [h // 2 for h in range(4)] * 3


def test_head_scores_figure_is_the_layer_by_head_table(random_model):
    table = head_scores(random_model, PROMPT, progress=False)
    fig = head_scores_figure(table, "duplicate_token")
    np.testing.assert_allclose(
        np.asarray(fig.data[0].z, dtype=float), table["duplicate_token"].unstack().to_numpy()
    )
    assert list(fig.data[0].x) == ["H0", "H1", "H2", "H3"] and list(fig.data[0].y) == ["L0", "L1", "L2"]
    with pytest.raises(ValueError, match="previous_token, duplicate_token, induction"):
        head_scores_figure(table, "copying")


# ------------------------------------------------------------------------------------------------ explorer
def test_controls_update_the_figures_from_one_forward(random_model):
    references = reference_patterns(random_model, PROMPT)
    with ForwardCounter(random_model) as forwards:
        explorer = AttentionExplorer(random_model, PROMPT)
        assert forwards.calls == 1
        before = np.asarray(explorer.figure.data[0].z, dtype=float).copy()
        explorer.layer.value = 2
        explorer.head.value = 3
        after = np.asarray(explorer.figure.data[0].z, dtype=float)
        assert not np.allclose(np.nan_to_num(before), np.nan_to_num(after))
        np.testing.assert_allclose(np.nan_to_num(after), references[2][3].numpy(), atol=TOL)
        assert np.isnan(after[0, 1]) and not np.isnan(after[1, 0])  # the future is blank, not zero
        for h, trace in enumerate(explorer.grid.data):
            np.testing.assert_allclose(cells(trace.z), references[2][h].numpy(), atol=TOL)
        explorer.token.value = 4
        explorer.show(layer=1, head=0)
        assert forwards.calls == 1, "a view-only change ran the model"
        np.testing.assert_allclose(cells(explorer.figure.data[0].z), references[1][0], atol=TOL)
        explorer.run("w5 w6 w7")
        explorer.run(PROMPT)  # seen before: served from the cache
        assert forwards.calls == 2 and explorer.model_runs == 2
    # What the widgets send to the browser must be strict JSON (a NaN cell would break the message).
    for view in (explorer.figure, explorer.grid):
        json.dumps(view.outputs, allow_nan=False)
        assert list(view.outputs[0]["data"]) == ["application/vnd.plotly.v1+json", "text/plain"]
    assert attached_hooks(random_model) == 0


def test_axes_are_labelled_with_the_tokens(random_model):
    explorer = AttentionExplorer(random_model, PROMPT)
    layout = explorer.figure.layout
    # "<s>" would be read as a tag: escaped, and numbered so that a repeated token keeps its own column
    shown = random_model.token_labels(random_model.to_tokens(PROMPT)[0])  # display text: "␣w1"
    tokens = [f"{i}: {html.escape(t)}" for i, t in enumerate(shown)]
    assert tokens[0] == "0: &lt;s&gt;"
    assert list(layout.xaxis.ticktext) == tokens and list(layout.yaxis.ticktext) == tokens
    assert list(layout.xaxis.tickvals) == list(range(len(tokens)))


def test_token_view_colours_the_row_and_the_column_of_the_chosen_token(random_model):
    explorer = AttentionExplorer(random_model, PROMPT, layer=1, head=2)
    reference = reference_patterns(random_model, PROMPT)[1][2].numpy()
    explorer.token.value = 6
    shown_row = [float(v) for v in re.findall(r"title=\"\d+ [^:]*: ([0-9.]+)\"", explorer.attends_to.value)]
    shown_col = [float(v) for v in re.findall(r"title=\"\d+ [^:]*: ([0-9.]+)\"", explorer.attended_by.value)]
    np.testing.assert_allclose(shown_row, reference[6], atol=1e-3)
    np.testing.assert_allclose(shown_col, reference[:, 6], atol=1e-3)
    assert "outline:2px" in explorer.attends_to.value
    explorer.select_token(9)
    assert explorer.token.value == 9


def test_the_kv_group_label_follows_the_head(random_model):
    explorer = AttentionExplorer(random_model, PROMPT)
    explorer.head.value = 1
    assert "KV head 0" in explorer.kv_label.value and "heads 0, 1" in explorer.kv_label.value
    explorer.head.value = 3
    assert "KV head 1" in explorer.kv_label.value and "heads 2, 3" in explorer.kv_label.value
    assert "reads KV head 1" in explorer.figure.layout.title.text
    assert [a.text for a in explorer.grid.layout.annotations] == [
        "H0 · KV 0",
        "H1 · KV 0",
        "H2 · KV 1",
        "H3 · KV 1",
    ]


def test_long_prompts_show_a_window(random_model):
    prompt = " ".join(f"w{i % 50}" for i in range(200))
    explorer = AttentionExplorer(random_model, prompt, window_size=32)
    reference = reference_patterns(random_model, prompt)[0][0].numpy()
    assert explorer.window.layout.display is None and explorer.window.max == 201 - 32
    explorer.window.value = 100
    z = np.asarray(explorer.figure.data[0].z, dtype=float)
    assert z.shape == (32, 33) and list(explorer.figure.data[0].x) == [0, *range(100, 132)]
    np.testing.assert_allclose(np.nan_to_num(z), reference[100:132, [0, *range(100, 132)]], atol=TOL)
    assert [v for _, v in explorer.token.options] == list(range(100, 132))
    # Most of these rows' attention lies outside the window: the colour scale follows what is shown.
    assert explorer.figure.data[0].zmax == pytest.approx(np.nanmax(z)) and np.nanmax(z) < 1
    with pytest.raises(IndexError, match="not on screen"):
        explorer.show(token=5)


LONG = " ".join(f"w{(i * 7) % 61}" for i in range(300))  # 301 tokens with BOS


@pytest.fixture(scope="module")
def long_reference(random_model):
    return reference_patterns(random_model, LONG)


def test_the_key_window_moves_independently_and_the_outside_column_is_the_rest(random_model, long_reference):
    explorer = AttentionExplorer(random_model, LONG, layer=1, head=3, window_size=40)
    reference = long_reference[1][3].numpy()  # the full [query, key] pattern from hook_pattern
    explorer.window.value = 250
    assert explorer.follow.value and explorer.keys == [0, *range(250, 290)]  # BOS pinned, keys follow
    explorer.show_keys(30)
    assert not explorer.follow.value, "moving the keys by hand detaches them from the queries"
    assert explorer.queries == range(250, 290) and explorer.keys == [0, *range(30, 70)]
    columns = [0, *range(30, 70)]
    z = np.asarray(explorer.figure.data[0].z, dtype=float)
    np.testing.assert_allclose(z, reference[250:290][:, columns], atol=TOL)
    assert list(explorer.figure.data[0].x) == columns and list(explorer.figure.data[0].y) == list(
        range(250, 290)
    )
    # The last column: per row, the attention on every key not drawn, straight from the full pattern.
    hidden = np.ones(reference.shape[1], dtype=bool)
    hidden[columns] = False
    expected = reference[250:290][:, hidden].sum(-1)
    np.testing.assert_allclose(explorer.outside, expected, atol=TOL)
    np.testing.assert_allclose(np.asarray(explorer.figure.data[1].z, dtype=float)[:, 0], expected, atol=TOL)
    assert explorer.figure.data[1].x == ("outside",) and expected.max() > 0.1  # a real share, not rounding
    np.testing.assert_allclose(z.sum(-1) + expected, 1.0, atol=1e-5)
    # Keys after the query rows lie in the future: drawn blank, never counted outside.
    explorer.show_keys(280)
    z = np.asarray(explorer.figure.data[0].z, dtype=float)
    assert explorer.keys == [0, *range(261, 301)]  # the window stops at the prompt's end
    assert np.isnan(z[0, -1]) and not np.isnan(z[-1, 1])
    np.testing.assert_allclose(explorer.outside, reference[250:290, 1:261].sum(-1), atol=TOL)
    explorer.follow.value = True
    assert explorer.keys == [0, *range(250, 290)]


def test_attention_window_takes_any_increasing_key_positions(random_model, long_reference):
    attention = cache_attention(random_model, LONG)
    keys = [0, 5, 100, 101, 260]
    pattern, outside = attention_window(attention, 2, [1, 0], queries=range(200, 270), keys=keys)
    reference = long_reference[2][[1, 0], 200:270].numpy()
    np.testing.assert_allclose(pattern.numpy(), reference[:, :, keys], atol=TOL)
    np.testing.assert_allclose(outside.numpy(), reference.sum(-1) - reference[:, :, keys].sum(-1), atol=TOL)
    with pytest.raises(ValueError, match="increasing"):
        attention_window(attention, 0, keys=[5, 3])
    with pytest.raises(IndexError, match="outside the prompt"):
        attention_window(attention, 0, keys=[0, 301])


def test_the_top_keys_are_the_largest_of_the_whole_row(random_model, long_reference):
    explorer = AttentionExplorer(random_model, LONG, layer=2, head=1, window_size=32, top_k=7)
    explorer.window.value = 260
    explorer.token.value = 275
    row = long_reference[2][1, 275].numpy()
    top = explorer.top_keys
    order = np.argsort(-row, kind="stable")[:7]
    assert list(top["key"]) == order.tolist()
    np.testing.assert_allclose(top["attention"], row[order], atol=TOL)
    np.testing.assert_allclose(top["cumulative"].iloc[-1], row[order].sum(), atol=TOL)
    labels = random_model.token_labels(random_model.to_tokens(LONG)[0])
    assert list(top["token"]) == [labels[k] for k in order]
    assert "Where does" in explorer.looks.value and f">{order[0]}<" in explorer.looks.value
    assert list(top_keys(explorer.attention, 2, 1, 275, k=3)["key"]) == order[:3].tolist()


def test_the_explorer_takes_a_token_tensor(random_model):
    tokens = random_model.to_tokens(PROMPT)
    for prompt in (tokens, tokens[0], tokens[0].tolist()):
        explorer = AttentionExplorer(random_model, prompt)
        assert explorer.attention.n_tokens == tokens.shape[1] and explorer.model_runs == 1
        np.testing.assert_allclose(
            np.nan_to_num(explorer.pattern), reference_patterns(random_model, PROMPT)[0][0], atol=TOL
        )


def test_cached_prompts_stay_in_the_model_dtype_within_the_memory_budget(random_model):
    bf16 = HookedApertus(
        random_apertus(layers=2, heads=4, kv_heads=2, d_model=64, seed=3).to(torch.bfloat16), None
    )
    tokens = torch.randint(4, 96, (40,), generator=torch.Generator().manual_seed(1))
    attention = cache_attention(bf16, tokens)
    assert {t.dtype for t in (*attention.queries, *attention.keys)} == {torch.bfloat16}
    one = attention.nbytes
    assert one == 2 * 40 * (4 + 2) * 16 * 2  # layers x pos x (heads + kv heads) x d_head x 2 bytes
    pattern = attention_pattern(attention, 1)
    assert pattern.dtype == torch.float32 and torch.allclose(pattern.sum(-1), torch.ones(4, 40), atol=1e-5)
    explorer = AttentionExplorer(bf16, tokens, memory_budget=int(2.5 * one), cached_prompts=10)
    for seed in range(2, 6):
        explorer.run(torch.randint(4, 96, (40,), generator=torch.Generator().manual_seed(seed)))
        assert explorer.cached_bytes <= 2.5 * one
    assert len(explorer._forwards) == 2 and explorer.model_runs == 5


def test_bad_input_is_reported(random_model):
    explorer = AttentionExplorer(random_model)
    with pytest.raises(RuntimeError, match="No prompt yet"):
        explorer.pattern  # noqa: B018
    explorer.prompt_box.value = "   "
    explorer.run_button.click()
    assert "prompt is empty" in explorer.status.value
    with pytest.raises(IndexError, match=r"0..3"):
        explorer.show(head=4)
    with pytest.raises(IndexError, match=r"0..2"):
        AttentionExplorer(random_model, layer=7)


# -------------------------------------------------------------------------------------------- head summary
def test_head_summary_opens_heads_in_the_explorer(random_model):
    explorer = AttentionExplorer(random_model, PROMPT)
    summary = HeadSummary(random_model, PROMPT, explorer=explorer)
    table = summary.scores
    np.testing.assert_allclose(
        np.asarray(summary.figure.data[0].z, dtype=float), table["induction"].unstack()
    )
    summary.score.value = "previous_token"
    np.testing.assert_allclose(
        np.asarray(summary.figure.data[0].z, dtype=float), table["previous_token"].unstack()
    )
    assert summary.head.options[0][1] == table["previous_token"].idxmax()
    summary.head.value = (2, 1)
    summary.open_button.click()
    assert (explorer.layer.value, explorer.head.value) == (2, 1)
    layer, head = summary.top("induction", 1).index[0]  # numpy integers, straight from the DataFrame
    summary.open(layer, head)
    assert (explorer.layer.value, explorer.head.value) == (layer, head)
    summary.head.value = (1, 3)
    summary.open_button.click()
    assert (explorer.layer.value, explorer.head.value) == (1, 3)
    assert list(summary.top("previous_token", 2).index) == list(table["previous_token"].nlargest(2).index)
    with pytest.raises(RuntimeError, match="no explorer"):
        HeadSummary(random_model, scores=table).open(0, 0)
