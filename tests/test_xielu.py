"""The xIELU view: the curve is transformers' own, the regimes split where the calculus says, and the
streaming statistics agree with a brute-force pass over the same data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import attached_hooks
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.activations import XIELUActivation

from workbench import xielu as X

FALLING, RISING, POSITIVE = X.REGIMES.index("negative falling"), X.REGIMES.index("negative rising"), 0
PROMPTS = [" ".join(f"w{(7 * i + 3 * j) % 90}" for j in range(4 + i % 9)) for i in range(23)]


def grid() -> torch.Tensor:
    # Dense near 0 and the eps clamp, and far out on the negative side where the branch rises again.
    return torch.cat(
        [torch.linspace(-40, 6, 2001), torch.linspace(-3e-6, 3e-6, 61), torch.tensor([0.0, -1e-6])]
    )


def test_curve_equals_the_models_own_activation_modules(random_model):
    x = grid()
    params = X.curve_table(random_model)
    for layer, decoder in enumerate(random_model.hf_model.model.layers):
        p = params.loc[layer]
        with torch.no_grad():
            expected = decoder.mlp.act_fn(x)
        got = X.xielu(x, p.alpha_p, p.alpha_n, p.beta, p.eps).float()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        table = X.layer_curve(random_model, layer, x)
        torch.testing.assert_close(
            torch.tensor(table.y.values, dtype=torch.float32), expected, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize(
    "alpha_p,alpha_n,beta", [(0.8, 0.8, 0.5), (0.3, 2.0, 0.05), (1.5, 0.2, -0.4), (0.5, 0.9, 0.0)]
)
def test_curve_equals_xielu_activation_with_other_scalars(alpha_p, alpha_n, beta):
    act = XIELUActivation(alpha_p_init=alpha_p, alpha_n_init=alpha_n, beta=beta, dtype=torch.float32)
    x = grid()
    with torch.no_grad():
        expected = act(x)
    torch.testing.assert_close(
        X.xielu(x, alpha_p, alpha_n, beta, -1e-6).float(), expected, rtol=1e-5, atol=1e-6
    )


@settings(max_examples=30, deadline=None)
@given(beta=st.floats(0.01, 3.0), gap=st.floats(0.01, 5.0))
def test_minimum_is_where_the_branch_turns(beta, gap):
    alpha_n = beta + gap  # alpha_n = beta + softplus(.) > beta, as the activation builds it
    x_star = X.negative_minimum(alpha_n, beta, -1e-6)
    assert x_star is not None and x_star < 0
    x = torch.tensor(x_star, dtype=torch.float64, requires_grad=True)
    X.xielu(x, 1.0, alpha_n, beta, -1e-6).backward()
    assert abs(x.grad.item()) < 1e-9
    # It is the lowest point of the branch on a fine grid that spans it.
    xs = torch.linspace(50 * x_star, -1e-5, 20_001, dtype=torch.float64)
    ys = X.xielu(xs, 1.0, alpha_n, beta, -1e-6)
    assert (
        float(ys.min())
        >= float(X.xielu(torch.tensor(x_star, dtype=torch.float64), 1.0, alpha_n, beta, -1e-6)) - 1e-12
    )
    assert abs(float(xs[ys.argmin()]) - x_star) <= float(xs[1] - xs[0]) * 2


def test_no_minimum_when_the_branch_only_rises():
    for beta in (0.0, -0.3):
        assert X.negative_minimum(1.0, beta, -1e-6) is None
        xs = torch.linspace(-20, 0, 10_001, dtype=torch.float64)
        ys = X.xielu(xs, 1.0, 1.0, beta, -1e-6)
        assert bool((ys.diff() <= 0).all()), "without a minimum the branch must fall monotonically towards 0"
        assert X.regime_boundary(1.0, beta, -1e-6) == 0.0
    # beta so small that the smooth branch's critical point lies inside the clamp (eps, 0]: no minimum either.
    tiny = 1e-8
    assert math.log1p(-tiny / 1.0) > -1e-6
    assert X.negative_minimum(1.0, tiny, -1e-6) is None


def test_regimes_at_the_boundaries():
    x_star = X.negative_minimum(0.8, 0.5, -1e-6)
    assert x_star == pytest.approx(math.log(1 - 0.5 / 0.8))
    below, above = np.nextafter(x_star, -np.inf), np.nextafter(x_star, np.inf)
    x = torch.tensor([1e-30, 0.0, -1e-7, -1e-6, above, x_star, below, -50.0, 3.0], dtype=torch.float64)
    got = X.classify_regimes(x, x_star).tolist()
    assert got == [POSITIVE, FALLING, FALLING, FALLING, FALLING, RISING, RISING, RISING, POSITIVE]
    # Without a minimum every x <= 0 rises, and 0 itself is negative, not positive (the branch is x > 0).
    assert X.classify_regimes(torch.tensor([1e-30, 0.0, -1e-7, -5.0]), 0.0).tolist() == [
        POSITIVE,
        RISING,
        RISING,
        RISING,
    ]


def brute_force(model, prompts, batch_size=4):
    """Every (real, non-BOS) token's pre- and post-activations per layer, from cached runs of the same batches
    (padded batches round differently in the last bit, so the reference runs the very same batches)."""
    pre, post, where = {}, {}, []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        _, cache = model.run_with_cache(
            batch, names_filter=lambda n: n.startswith("blocks.") and "mlp.hook_" in n
        )
        for i, text in enumerate(batch):
            n = len(model.to_str_tokens(text))
            for layer in range(model.cfg.n_layers):
                pre.setdefault(layer, []).append(cache[f"blocks.{layer}.mlp.hook_pre"][i, 1:n])
                post.setdefault(layer, []).append(cache[f"blocks.{layer}.mlp.hook_post"][i, 1:n])
            where += [(start + i, p) for p in range(1, n)]
    return {la: torch.cat(v) for la, v in pre.items()}, {la: torch.cat(v) for la, v in post.items()}, where


@pytest.fixture(scope="module")
def stats_and_reference(random_model):
    stats = X.xielu_statistics(random_model, PROMPTS, batch_size=4, top_k=5, progress=False)
    return stats, brute_force(random_model, PROMPTS)


def test_statistics_match_a_brute_force_pass(random_model, stats_and_reference):
    stats, (pre, post, where) = stats_and_reference
    assert stats.n_tokens == len(where) and stats.n_prompts == len(PROMPTS)
    w_down = [d.mlp.down_proj.weight for d in random_model.hf_model.model.layers]
    for layer in range(random_model.cfg.n_layers):
        boundary = float(stats.params.loc[layer, "boundary"])
        regime = X.classify_regimes(pre[layer], boundary)
        counts = torch.stack([(regime == r).sum(0) for r in range(3)], -1)
        np.testing.assert_array_equal(stats.counts[layer], counts.numpy())
        # Each regime's part of the MLP output, through down_proj, summed over tokens.
        for r in range(3):
            part = torch.where(regime == r, post[layer], 0.0) @ w_down[layer].T
            assert stats.output_norm[layer, r] == pytest.approx(
                float(part.norm(dim=-1).sum()), rel=1e-4, abs=1e-6
            )
        # The regime parts add up to the MLP output itself.
        total = post[layer] @ w_down[layer].T
        parts = sum(torch.where(regime == r, post[layer], 0.0) @ w_down[layer].T for r in range(3))
        torch.testing.assert_close(parts, total)
        # The histogram holds every activation once.
        assert stats.hist[layer].sum() + stats.outside[layer].sum() == pre[layer].numel()
        # Top and bottom k per neuron are the k most extreme values of the whole pass.
        np.testing.assert_allclose(stats.top_values[layer], pre[layer].T.topk(5).values.numpy(), rtol=1e-6)
        np.testing.assert_allclose(
            stats.bottom_values[layer], (-pre[layer].T).topk(5).values.neg().numpy(), rtol=1e-6
        )
    shares = stats.regime_shares()
    np.testing.assert_allclose(shares.sum(1), 1.0)
    assert list(shares.columns) == list(X.REGIMES)


def test_examples_point_at_the_right_tokens(random_model, stats_and_reference):
    stats, (pre, _, where) = stats_and_reference
    layer, neuron = 2, 17
    for which in ("top", "bottom"):
        table = stats.examples(layer, neuron, which)
        assert len(table) == 5
        for row in table.itertuples():
            tokens = random_model.token_labels(random_model.to_tokens(PROMPTS[row.prompt])[0])
            assert row.token == tokens[row.position] == row.context[row.focus]
            assert row.context == tokens[max(0, row.position - stats.context_before) : row.position + 3]
            index = where.index((row.prompt, row.position))
            assert row.value == pytest.approx(float(pre[layer][index, neuron]))
    assert (stats.examples(layer, neuron, "top").value.diff().dropna() <= 0).all()


def test_statistics_do_not_depend_on_batching_and_stay_bounded(random_model, stats_and_reference):
    stats, _ = stats_and_reference
    value_range = (float(stats.bin_edges[0, 0]), float(stats.bin_edges[0, -1]))
    one = X.xielu_statistics(
        random_model, iter(PROMPTS), batch_size=23, top_k=5, progress=False, value_range=value_range
    )
    # Other batches pad differently, which moves activations in the last bits only.
    assert np.abs(one.counts - stats.counts).sum() <= 2
    np.testing.assert_allclose(one.top_values, stats.top_values, rtol=1e-5, atol=1e-6)
    assert (one.top_where == stats.top_where).mean() > 0.99
    assert np.abs(one.hist[0] - stats.hist[0]).sum() <= 4
    small = X.xielu_statistics(random_model, PROMPTS[:3], top_k=5, progress=False)
    sizes = lambda s: [a.nbytes for a in (s.hist, s.counts, s.top_values, s.top_context, s.post_abs)]  # noqa: E731
    assert sizes(small) == sizes(one)
    assert attached_hooks(random_model) == 0


def test_token_tensor_input_and_layer_subset(random_model):
    tokens = random_model.to_tokens(PROMPTS[5])
    stats = X.xielu_statistics(random_model, tokens.repeat(3, 1), layers=[1], skip_bos=False, progress=False)
    assert stats.n_tokens == 3 * tokens.shape[1]
    assert list(stats.regime_shares().index) == [1]
    assert (
        stats.counts[0].sum() == 0 and stats.counts[1].sum() == 3 * tokens.shape[1] * random_model.cfg.d_mlp
    )


def test_neuron_output_direction_reads_through_the_unembedding(random_model):
    layer, neuron = 1, 40
    table = X.neuron_output_tokens(random_model, layer, neuron, k=4)
    hf = random_model.hf_model
    with torch.no_grad():
        logits = hf.lm_head(hf.model.norm.weight * hf.model.layers[layer].mlp.down_proj.weight[:, neuron])
    promoted = table[table.kind == "promoted"]
    suppressed = table[table.kind == "suppressed"]
    assert promoted.token_id.tolist() == logits.topk(4).indices.tolist()
    assert suppressed.token_id.tolist() == (-logits).topk(4).indices.tolist()
    np.testing.assert_allclose(promoted.logit, logits.topk(4).values.numpy(), rtol=1e-5)


def test_neuron_regime_shares_follow_the_counts(stats_and_reference):
    stats, (pre, post, _) = stats_and_reference
    table = stats.neuron_regimes(0, 3)
    regime = X.classify_regimes(pre[0][:, 3], float(stats.params.loc[0, "boundary"]))
    for r, name in enumerate(X.REGIMES):
        assert table.loc[name, "count"] == int((regime == r).sum())
        expected = post[0][:, 3].abs()[regime == r].sum() / post[0][:, 3].abs().sum()
        assert table.loc[name, "share_of_output"] == pytest.approx(float(expected), rel=1e-5, abs=1e-7)


def test_clear_errors(random_model):
    with pytest.raises(IndexError, match="neuron 9999 is out of range"):
        X.neuron_output_tokens(random_model, 0, 9999)
    with pytest.raises(IndexError, match="layer 7 is out of range"):
        X.xielu_figure(random_model, 7)
    with pytest.raises(TypeError, match="single str"):
        X.xielu_statistics(random_model, "w1 w2", progress=False)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        X.xielu_statistics(random_model, PROMPTS, top_k=0, progress=False)
    with pytest.raises(ValueError, match="which must be"):
        X.XIELUStatistics.examples(None, 0, 0, "middle")


def test_figures_show_the_chosen_layer(random_model, stats_and_reference):
    stats, _ = stats_and_reference
    params = X.curve_table(random_model)
    for layer in range(random_model.cfg.n_layers):
        fig = X.xielu_figure(random_model, layer, stats)
        minimum = [t for t in fig.data if t.name == "minimum"]
        assert minimum and minimum[0].x[0] == pytest.approx(params.loc[layer, "x_min"])
        bars = [t for t in fig.data if t.type == "bar"]
        assert sum(np.asarray(b.y).size for b in bars) == stats.hist.shape[1]
    shares = X.regime_share_figure(stats)
    assert [t.name for t in shares.data] == list(X.REGIMES)
    np.testing.assert_allclose(shares.data[0].y, stats.regime_shares()["positive"])


@pytest.fixture(scope="module")
def bf16_model(random_checkpoint):
    import workbench

    return workbench.load(random_checkpoint, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streaming_reduction_equals_a_direct_computation_from_a_full_cache(random_model, bf16_model, dtype):
    """The hooks fold each layer as the forward passes it, in neuron chunks, projecting two regimes and taking
    the third as the MLP output minus them; the same statistics computed directly from a full cache of one
    unpadded batch, with three float32 projections per layer as before, agree."""
    model = random_model if dtype == "float32" else bf16_model
    tokens = torch.stack([model.to_tokens(p)[0, :5] for p in PROMPTS[8:14]])  # 6 x 5, no padding
    stats = X.xielu_statistics(model, tokens, top_k=3, neuron_chunk=37, progress=False)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "mlp.hook_" in n)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == "float32" else {"rtol": 2e-3, "atol": 1e-4}
    for layer in range(model.cfg.n_layers):
        pre = cache[f"blocks.{layer}.mlp.hook_pre"][:, 1:].flatten(0, 1).float()
        post = cache[f"blocks.{layer}.mlp.hook_post"][:, 1:].flatten(0, 1).float()
        regime = X.classify_regimes(pre, float(stats.params.loc[layer, "boundary"]))
        w_down = model.hf_model.model.layers[layer].mlp.down_proj.weight.float()
        for r in range(3):
            in_r = regime == r
            np.testing.assert_array_equal(stats.counts[layer, :, r], in_r.sum(0).numpy())
            np.testing.assert_allclose(
                stats.post_abs[layer, :, r], torch.where(in_r, post.abs(), 0).sum(0).numpy(), **tol
            )
            norm = (torch.where(in_r, post, 0.0) @ w_down.T).norm(dim=-1).sum()
            assert stats.output_norm[layer, r] == pytest.approx(float(norm), rel=tol["rtol"] * 10)
        edges = stats.bin_edges[layer]
        expected_hist = torch.histc(pre.flatten(), stats.hist.shape[1], float(edges[0]), float(edges[-1]))
        np.testing.assert_array_equal(stats.hist[layer], expected_hist.long().numpy())
        top = pre.T.topk(3)
        np.testing.assert_array_equal(stats.top_values[layer], top.values.numpy())
        # Each example points at a token holding its value (ties may pick either of the equal tokens).
        full = cache[f"blocks.{layer}.mlp.hook_pre"].float()
        where = torch.from_numpy(stats.top_where[layer])
        at = full[where[..., 0], where[..., 1], torch.arange(full.shape[-1])[:, None]]
        np.testing.assert_array_equal(at.numpy(), top.values.numpy())
        np.testing.assert_array_equal(stats.bottom_values[layer], pre.T.topk(3, largest=False).values.numpy())
    # Chunking over neurons changes nothing.
    whole = X.xielu_statistics(model, tokens, top_k=3, neuron_chunk=10_000, progress=False)
    for name in ("counts", "hist", "top_values", "top_context", "top_where", "bottom_where"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(stats, name))
    np.testing.assert_allclose(whole.output_norm, stats.output_norm, rtol=1e-5)
    assert attached_hooks(model) == 0


def test_neuron_directions_read_the_unembedding_in_chunks(bf16_model):
    layer, neuron = 2, 5
    hf = bf16_model.hf_model
    direction = hf.model.norm.weight * hf.model.layers[layer].mlp.down_proj.weight[:, neuron]
    expected = direction.float() @ bf16_model.W_U.float()
    for chunk in (7, 96, 10_000):
        torch.testing.assert_close(X.direction_scores(bf16_model, direction, chunk=chunk), expected)
    table = X.neuron_output_tokens(bf16_model, layer, neuron, k=3)
    assert table[table.kind == "promoted"].token_id.tolist() == expected.topk(3).indices.tolist()
