"""Residual-stream lenses: the logit lens is the model's own read-out at every depth, and the parts of the
final residual stream sum to the whole, in the residual basis and in logit space."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import attached_hooks
from torch import nn

import workbench
from workbench import HookedApertus
from workbench import lens as L
from workbench.checkpoint import DEFAULT_CHECKPOINT
from workbench.checkpoint.synthetic import random_apertus

PROMPT = "w1 w2 w3 w4 w5 w1 w2 w3"
BATCH = ["w1 w2 w3 w4 w5 w1 w2", "w9 w8 w7", "w10 w11 w12 w13 w10"]


def test_last_layer_of_the_lens_is_the_models_logits(random_model):
    lens = L.lens_logits(random_model, BATCH)
    assert lens.shape[0] == random_model.cfg.n_layers + 1
    with torch.no_grad():
        logits = random_model(BATCH)
        tokens, mask = random_model.tokenize(BATCH)
        reference = random_model.hf_model(tokens, attention_mask=mask).logits
    torch.testing.assert_close(lens[-1], logits, rtol=0, atol=0)
    real = mask.bool()
    torch.testing.assert_close(lens[-1][real], reference[real], rtol=1e-5, atol=1e-5)


def test_each_layer_is_read_with_its_own_rms_scale(random_model):
    lens = L.lens_logits(random_model, PROMPT)
    hf = random_model.hf_model
    for layer in range(random_model.cfg.n_layers + 1):
        with torch.no_grad():
            resid = random_model(PROMPT, stop_at_layer=layer)  # the stream entering `layer`
            expected = hf.lm_head(hf.model.norm(resid))  # transformers' own RMSNorm
        torch.testing.assert_close(lens[layer], expected, rtol=1e-5, atol=1e-6)


def test_table_figure_and_trajectory_agree_with_the_logits(random_model):
    lens = L.lens_logits(random_model, PROMPT)[:, 0]
    table = L.logit_lens_table(random_model, PROMPT, k=3)
    n_pos = lens.shape[1]
    assert len(table) == (random_model.cfg.n_layers + 1) * n_pos * 3
    top1 = table[table["rank"] == 0].sort_values(["layer_index", "position"]).token_id.to_numpy()
    np.testing.assert_array_equal(top1, lens.argmax(-1).flatten().numpy())

    fig = L.logit_lens_figure(random_model, PROMPT, k=3)
    assert np.asarray(fig.data[0].z).shape == (random_model.cfg.n_layers + 1, n_pos)
    np.testing.assert_allclose(
        np.asarray(fig.data[0].z)[-1], lens[-1].softmax(-1).max(-1).values.numpy(), rtol=1e-5
    )

    answer = int(lens[-1, -1].argmax())
    traj = L.target_trajectory(random_model, PROMPT, answer)
    assert traj["rank"].iloc[-1] == 0
    probs = lens[:, -1].softmax(-1)[:, answer]
    np.testing.assert_allclose(traj.prob, probs.numpy(), rtol=1e-5)
    ranks = [int((lens[la, -1] > lens[la, -1, answer]).sum()) for la in range(lens.shape[0])]
    assert traj["rank"].tolist() == ranks
    assert L.trajectory_figure(traj).data[0].y.tolist() == pytest.approx(traj.prob.tolist())


def test_decomposition_sums_to_the_final_residual(random_model):
    dec = L.residual_decomposition(random_model, BATCH)
    n = random_model.cfg.n_layers
    assert len(dec.labels) == 1 + n * (random_model.cfg.n_heads + 1)
    assert dec.max_error() <= 1e-5
    _, cache = random_model.run_with_cache(BATCH, names_filter=lambda name: name.endswith("hook_attn_out"))
    real = dec.attention_mask.bool()  # padding positions are nobody's output
    for layer in range(n):
        heads = dec.components[
            [i for i, la in enumerate(dec.layers) if la == layer and dec.kinds[i] == "head"]
        ]
        attn_out = cache[f"blocks.{layer}.hook_attn_out"]
        torch.testing.assert_close(heads.sum(0)[real], attn_out[real], rtol=1e-5, atol=1e-6)
    table = dec.table(batch=1, position=-1)
    assert table.along_final.sum() == pytest.approx(float(dec.final_resid[1, -1].norm()), rel=1e-4)
    assert attached_hooks(random_model) == 0


def test_decomposition_rows_equal_transformer_lens(random_model):
    """Every row equals TransformerLens's `get_full_resid_decomposition` of the same run's cache."""
    dec = L.residual_decomposition(random_model, BATCH)
    stack, tl_labels = dec.cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    tl = dict(zip(tl_labels, stack))
    for row, label in enumerate(dec.labels):
        key = f"{label.split()[0][1:]}_mlp_out" if label.endswith("MLP") else label
        torch.testing.assert_close(dec.components[row], tl[key], rtol=1e-5, atol=1e-6)
    assert len(dec.labels) == len(tl) - ("bias" in tl)  # nothing left out (TL's one bias row is all zeros)


def test_decomposition_lists_a_bias_when_a_checkpoint_has_one():
    hf = random_apertus(layers=2, d_model=32, heads=4, kv_heads=2, vocab=40, seed=3)
    o_proj = hf.model.layers[1].self_attn.o_proj
    o_proj.bias = nn.Parameter(torch.randn(o_proj.out_features), requires_grad=False)
    model = HookedApertus(hf.eval(), tokenizer=None)
    tokens = torch.randint(0, 40, (2, 7))
    dec = L.residual_decomposition(model, tokens)
    assert "L1 attn bias" in dec.labels and "L0 attn bias" not in dec.labels
    assert dec.max_error() <= 1e-5


@pytest.mark.parametrize("left", [False, True])
def test_attributions_sum_to_the_logit_difference(random_model, left):
    random_model.tokenizer.padding_side = "left" if left else "right"
    try:
        answers, wrongs = [" w3", " w7", " w12"], [" w4", " w1", " w30"]
        table = L.direct_logit_attribution(random_model, BATCH, answers, wrongs)
        tokens, mask = random_model.tokenize(BATCH)
    finally:
        random_model.tokenizer.padding_side = "right"
    with torch.no_grad():
        logits = random_model.hf_model(
            tokens, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
    last = torch.tensor([int(row.nonzero().max()) for row in mask])
    a = torch.tensor([random_model.to_single_token(t) for t in answers])
    b = torch.tensor([random_model.to_single_token(t) for t in wrongs])
    rows = torch.arange(len(BATCH))
    expected = logits[rows, last, a] - logits[rows, last, b]
    torch.testing.assert_close(torch.tensor(table.attrs["per_prompt"]), expected, rtol=1e-4, atol=1e-4)
    assert abs(table.attribution.sum() - float(expected.mean())) <= 1e-4
    assert (torch.tensor(table.attrs["per_prompt_sum"]) - expected).abs().max() <= 1e-4
    assert set(table.kind) == {"embed", "head", "mlp"}


def test_single_logit_attribution_at_a_chosen_position(random_model):
    table = L.direct_logit_attribution(random_model, PROMPT, 7, position=3)
    with torch.no_grad():
        logit = random_model(PROMPT)[0, 3, 7]
    assert abs(table.attribution.sum() - float(logit)) <= 1e-4
    fig = L.dla_figure(table)
    assert np.asarray(fig.data[0].z).shape == (random_model.cfg.n_layers, random_model.cfg.n_heads + 1)


def test_clear_errors(random_model):
    with pytest.raises(IndexError, match="position 40 is out of range"):
        L.target_trajectory(random_model, PROMPT, " w3", position=40)
    with pytest.raises(ValueError, match="not a single token"):
        L.direct_logit_attribution(random_model, PROMPT, " w3 w4")
    with pytest.raises(ValueError, match="2 answer tokens for 3 prompts"):
        L.direct_logit_attribution(random_model, BATCH, [" w3", " w4"])
    with pytest.raises(ValueError, match="one prompt"):
        L.logit_lens_table(random_model, BATCH)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        L.logit_lens_table(random_model, PROMPT, k=0)


@pytest.mark.skipif(
    not (DEFAULT_CHECKPOINT / "model.safetensors").exists(), reason="trained checkpoint not built yet"
)
def test_trained_model_prefers_the_indirect_object_and_attribution_explains_it():
    from workbench.data.corpus import ioi_prompts

    model = workbench.load()
    prompts = ioi_prompts(12, templates=[0])
    table = L.direct_logit_attribution(
        model, [p.clean for p in prompts], [p.answer for p in prompts], [p.wrong for p in prompts]
    )
    assert table.attrs["total"] > 0
    assert abs(table.attribution.sum() - table.attrs["total"]) <= 1e-4
    traj = L.target_trajectory(model, prompts[0].clean, prompts[0].answer)
    assert traj["rank"].iloc[-1] < traj["rank"].iloc[0]


def test_chunked_top_k_equals_the_full_logits(random_model):
    """Top k and the softmax normaliser read in chunks of (layer, position) rows and of the vocabulary agree
    with the full [layers, batch, pos, vocab] logits."""
    lens = L.lens_logits(random_model, BATCH).float()
    top_logit, top_id, log_norm = L.logit_lens_topk(random_model, BATCH, k=4, row_chunk=5, vocab_chunk=7)
    expected = lens.topk(4, dim=-1)
    torch.testing.assert_close(top_logit, expected.values)
    _, mask = random_model.tokenize(BATCH)
    real = mask.bool()  # padding reads as all-zero logits: ties in any order
    assert torch.equal(top_id[:, real], expected.indices[:, real])
    torch.testing.assert_close(log_norm, lens.logsumexp(-1))


def test_trajectory_at_an_inner_position_reads_only_that_position(random_model):
    lens = L.lens_logits(random_model, PROMPT)[:, 0, 3].float()
    target = int(lens[1].argmax())
    traj = L.target_trajectory(random_model, PROMPT, target, position=3)
    assert traj["rank"].tolist() == [int((row > row[target]).sum()) for row in lens]
    np.testing.assert_allclose(traj.prob, lens.softmax(-1)[:, target].numpy(), rtol=1e-5)


def test_decomposition_at_one_position_per_prompt_is_the_full_one_there(random_model):
    full = L.residual_decomposition(random_model, BATCH)
    positions = [6, 2, 0]
    one = L.residual_decomposition(random_model, BATCH, positions=positions)
    rows = torch.arange(len(BATCH))
    assert one.components.shape == (len(full.labels), len(BATCH), 1, random_model.cfg.d_model)
    torch.testing.assert_close(one.components[:, :, 0], full.components[:, rows, positions])
    torch.testing.assert_close(one.logits[:, 0], full.logits[rows, positions], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one.scale[:, 0], full.scale[rows, positions])
    assert one.max_error() <= 1e-5
    assert one.table(batch=1).along_final.tolist() == pytest.approx(
        full.table(batch=1, position=2).along_final.tolist(), rel=1e-5, abs=1e-6
    )
    with pytest.raises(ValueError, match="2 positions for 3 prompts"):
        L.residual_decomposition(random_model, BATCH, positions=[1, 2])
