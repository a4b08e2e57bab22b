"""Activation patching: equal to TransformerLens's patching on the bridge, to one-at-a-time patching, to
finite differences (attribution); known answers on the embedded model; clear errors; the view's state."""

from __future__ import annotations

import pytest
import torch
from conftest import attached_hooks

import workbench
from workbench.checkpoint import DEFAULT_CHECKPOINT
from workbench.patching import PatchingExperiment, attribution_patch, correlation, patch

CLEAN = ["w3 w7 w1 w9 w3 w7 w1 w2 w4", "w5 w8 w2 w6 w5 w8 w2 w1 w9"]
CORRUPTED = ["w3 w7 w5 w9 w3 w7 w0 w2 w4", "w5 w8 w3 w6 w5 w8 w4 w1 w9"]
ANSWERS = [(" w10", " w11"), (" w12", " w13")]

# Where each component's cell lives in the activation, written out independently of the engine.
HOOK_AND_INDEX = {
    "resid_pre": ("hook_resid_pre", lambda c: (slice(None), c[1])),
    "resid_mid": ("hook_resid_mid", lambda c: (slice(None), c[1])),
    "resid_post": ("hook_resid_post", lambda c: (slice(None), c[1])),
    "attn_out": ("hook_attn_out", lambda c: (slice(None), c[1])),
    "mlp_out": ("hook_mlp_out", lambda c: (slice(None), c[1])),
    "heads": ("attn.hook_z", lambda c: (slice(None), slice(None), c[1])),
    "heads_by_pos": ("attn.hook_z", lambda c: (slice(None), c[2], c[1])),
    "q": ("attn.hook_q", lambda c: (slice(None), slice(None), c[1])),
    "k": ("attn.hook_k", lambda c: (slice(None), slice(None), c[1])),
    "v": ("attn.hook_v", lambda c: (slice(None), slice(None), c[1])),
    "pattern": ("attn.hook_pattern", lambda c: (slice(None), c[1])),
    "neurons": ("mlp.hook_post", lambda c: (slice(None), slice(None), c[1])),
}


def logit_diff_metric(model, answers):
    ids = torch.tensor([[model.to_single_token(a), model.to_single_token(b)] for a, b in answers])

    def metric(logits):
        last = logits[:, -1]
        return (last.gather(1, ids[:, :1]) - last.gather(1, ids[:, 1:])).mean()

    return metric


def one_at_a_time(model, base_tokens, source_cache, component, cell, metric):
    """One full forward with one cell copied from the source run."""
    hook, index = HOOK_AND_INDEX[component]
    name = f"blocks.{cell[0]}.{hook}"

    def set_cell(act, hook):
        act = act.clone()
        act[index(cell)] = source_cache[name][index(cell)]
        return act

    with torch.no_grad():
        return float(metric(model.run_with_hooks(base_tokens, fwd_hooks=[(name, set_cell)])))


@pytest.fixture(scope="module")
def tokens(random_model):
    return model_tokens(random_model)


def model_tokens(model):
    return model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)


# ------------------------------------------------------------------------------------------------ peer
@pytest.fixture(scope="module")
def bridge(random_checkpoint):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(random_checkpoint), device="cpu")


@pytest.mark.parametrize(
    "component, tl_name, permute",
    [
        ("resid_pre", "get_act_patch_resid_pre", None),
        ("attn_out", "get_act_patch_attn_out", None),
        ("mlp_out", "get_act_patch_mlp_out", None),
        ("heads", "get_act_patch_attn_head_out_all_pos", None),
        ("q", "get_act_patch_attn_head_q_all_pos", None),
        ("k", "get_act_patch_attn_head_k_all_pos", None),
        ("v", "get_act_patch_attn_head_v_all_pos", None),
        ("pattern", "get_act_patch_attn_head_pattern_all_pos", None),
    ],
)
def test_equals_transformer_lens_patching_on_the_bridge(
    random_model, bridge, tokens, component, tl_name, permute
):
    import transformer_lens.patching as tl_patching

    clean, corrupted = tokens  # token ids, not texts: the bridge's tokenizer wrapper may add its own <s>
    metric = logit_diff_metric(random_model, ANSWERS)
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean)
        theirs = getattr(tl_patching, tl_name)(bridge, corrupted, clean_cache, metric).double()
    theirs = theirs.permute(*permute) if permute else theirs
    experiment = PatchingExperiment(random_model, clean, corrupted, ANSWERS)
    builtin = experiment.run(component, "logit_diff", normalize=False, progress=False)
    callable_metric = experiment.run(component, metric, normalize=False, progress=False)
    assert builtin.grid().shape == theirs.shape
    assert (builtin.grid() - theirs).abs().max() <= 1e-4
    assert (callable_metric.grid() - theirs).abs().max() <= 1e-4
    assert theirs.std() > 1e-3  # the sweep moves the metric, so equality means something


def test_noising_equals_transformer_lens_with_the_roles_swapped(random_model, bridge, tokens):
    import transformer_lens.patching as tl_patching

    clean, corrupted = tokens
    metric = logit_diff_metric(random_model, ANSWERS)
    with torch.no_grad():
        _, corrupted_cache = bridge.run_with_cache(corrupted)
        theirs = tl_patching.get_act_patch_resid_pre(bridge, clean, corrupted_cache, metric).double()
    ours = patch(
        random_model, clean, corrupted, "logit_diff", answers=ANSWERS, direction="noise", normalize=False
    )
    assert (ours.grid() - theirs).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------- batched vs one
@pytest.mark.parametrize(
    "component, options",
    [
        ("resid_post", {}),
        ("heads_by_pos", {"layers": [2]}),
        ("k", {}),
        ("pattern", {}),
        ("neurons", {"layer": 1, "cells": [(1, n) for n in range(0, 256, 37)]}),
    ],
)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_batched_equals_one_at_a_time(random_model, tokens, component, options, direction):
    clean, corrupted = tokens
    metric = logit_diff_metric(random_model, ANSWERS)
    experiment = PatchingExperiment(random_model, clean, corrupted, ANSWERS)
    batched = experiment.run(
        component, "logit_diff", direction=direction, normalize=False, progress=False, **options
    )
    chunked = experiment.run(
        component,
        "logit_diff",
        direction=direction,
        normalize=False,
        progress=False,
        max_batch=5,
        skip_identical=False,
        **options,
    )
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    with torch.no_grad():
        _, source_cache = random_model.run_with_cache(source)
    reference = torch.tensor(
        [one_at_a_time(random_model, base, source_cache, component, c, metric) for c in batched.cells],
        dtype=torch.float64,
    )
    assert (batched.raw - reference).abs().max() <= 1e-5
    assert (chunked.raw - reference).abs().max() <= 1e-5
    assert reference.std() > 1e-4


def test_neurons_at_chosen_positions_patch_only_there(random_model, tokens):
    clean, corrupted = tokens
    experiment = PatchingExperiment(random_model, clean, corrupted, ANSWERS)
    everywhere = experiment.run("neurons", "logit_diff", layer=0, normalize=False, progress=False)
    at_bos = experiment.run(
        "neurons", "logit_diff", layer=0, positions=[0], normalize=False, progress=False, skip_identical=False
    )
    # <s> sees only itself, so its neurons agree in both runs and patching them there changes nothing.
    assert torch.allclose(at_bos.raw, torch.full_like(at_bos.raw, at_bos.corrupted_value), atol=1e-6)
    assert (everywhere.raw - everywhere.corrupted_value).abs().max() > 1e-3


@pytest.mark.parametrize("positions", [[6], [-1], [4, 7]])
def test_neurons_at_later_positions_run_only_from_there_and_equal_a_full_patched_run(
    random_model, tokens, positions, monkeypatch
):
    """Neurons patched at chosen positions recompute only from the first of them (the base run's keys and
    values before it); each equals one full forward with that neuron copied at those positions."""
    import workbench.patching.runner as runner_module

    widths = []
    forward_from = runner_module.forward_from

    def recording(model, joins, entry, *args):
        widths.extend(e.shape[1] for e in entry.values())
        return forward_from(model, joins, entry, *args)

    monkeypatch.setattr(runner_module, "forward_from", recording)
    clean, corrupted = tokens
    experiment = PatchingExperiment(random_model, clean, corrupted, ANSWERS)
    cells = [(1, n) for n in range(0, random_model.cfg.d_mlp, 29)]
    result = experiment.run(
        "neurons", "logit_diff", cells=cells, positions=positions, normalize=False, progress=False
    )
    _, source = random_model.run_with_cache(clean, names_filter=lambda n: n.endswith("mlp.hook_post"))
    metric = logit_diff_metric(random_model, ANSWERS)
    name = "blocks.1.mlp.hook_post"
    for (_, neuron), value in zip(cells, result.raw.tolist()):

        def set_neuron(act, hook, neuron=neuron):
            act = act.clone()
            act[:, positions, neuron] = source[name][:, positions, neuron]
            return act

        with torch.no_grad():
            expected = float(metric(random_model.run_with_hooks(corrupted, fwd_hooks=[(name, set_neuron)])))
        assert value == pytest.approx(expected, abs=1e-5)
    # Only the positions from the first patched one on were computed.
    n_pos = clean.shape[1]
    assert widths and set(widths) == {n_pos - min(p % n_pos for p in positions)}


def test_a_padded_batch_equals_its_pairs_run_alone(random_model):
    clean = ["w3 w7 w1 w9 w3 w7 w1 w2 w4", "w5 w8 w2 w6 w5"]
    corrupted = ["w3 w7 w5 w9 w3 w7 w0 w2 w4", "w5 w8 w3 w6 w5"]
    batch = patch(
        random_model, clean, corrupted, "logit_diff", answers=ANSWERS, normalize=False, progress=False
    )
    alone = [
        patch(random_model, c, k, "logit_diff", answers=a, normalize=False, progress=False)
        for c, k, a in zip(clean, corrupted, ANSWERS)
    ]
    short = alone[1].grid().shape[1]
    long_grid, short_grid = alone[0].grid(), alone[1].grid()
    expected = long_grid.clone()
    expected[:, :short] = (long_grid[:, :short] + short_grid) / 2
    # Past its end, the short prompt is padding: patching there leaves its own run (its base) unchanged.
    expected[:, short:] = (long_grid[:, short:] + alone[1].corrupted_value) / 2
    assert (batch.grid() - expected).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------- metrics
def test_normalised_metrics_read_zero_before_the_change_and_one_at_it(random_model):
    clean, corrupted = "w3 w7 w1 w9 w3 w7 w1 w2 w4", "w3 w7 w1 w5 w3 w7 w1 w2 w4"  # differ at position 4
    experiment = PatchingExperiment(random_model, clean, corrupted, (" w10", " w11"))
    for metric in ("logit_diff", "answer_prob", "kl"):
        grid = experiment.run("resid_pre", metric, progress=False, skip_identical=False).grid()
        # Layer 0's residual stream at the changed token is the whole difference: the clean run comes back.
        assert grid[0, 4].item() == pytest.approx(1.0, abs=1e-4), metric
        # Before it both runs are identical (causal attention), so patching changes nothing.
        assert grid[:, :4].abs().max().item() <= 1e-5, metric
        last = experiment.run("resid_post", metric, layers=[2], positions=[-1], progress=False).values
        assert last.item() == pytest.approx(1.0, abs=1e-4), metric  # everything the unembedding reads
    with torch.no_grad():
        clean_logits, corrupted_logits = random_model(clean)[0, -1], random_model(corrupted)[0, -1]
    p, q = clean_logits.double().log_softmax(-1), corrupted_logits.double().log_softmax(-1)
    assert experiment.baseline("kl", "corrupted") == pytest.approx((p.exp() * (p - q)).sum().item(), rel=1e-6)
    answer = random_model.to_single_token(" w10")
    assert experiment.baseline("answer_prob", "clean") == pytest.approx(p.exp()[answer].item(), rel=1e-5)


# --------------------------------------------------------------------------------------- attribution
@pytest.fixture(scope="module")
def model64(random_checkpoint):
    return workbench.load(random_checkpoint, dtype=torch.float64)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_is_the_directional_derivative(model64, direction):
    clean, corrupted = model_tokens(model64)
    metric = logit_diff_metric(model64, ANSWERS)
    experiment = PatchingExperiment(model64, clean, corrupted, ANSWERS)
    components = ["resid_pre", "attn_out", "heads", "heads_by_pos", "v", "pattern", "neurons"]
    results = experiment.attribute(components, "logit_diff", direction=direction, normalize=False, layer=1)
    assert attached_hooks(model64) == 0
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    with torch.no_grad():
        _, source_cache = model64.run_with_cache(source)
    m_base = experiment.baseline("logit_diff", "corrupted" if direction == "denoise" else "clean")
    for component, result in results.items():
        for i in torch.linspace(0, len(result.cells) - 1, 5).long().tolist():
            cell = result.cells[i]
            derivative = derivative_along_patch(model64, base, source_cache, component, cell, metric)
            assert result.raw[i].item() - m_base == pytest.approx(derivative, rel=1e-5, abs=1e-9), (
                component,
                cell,
            )


def derivative_along_patch(model, base_tokens, source_cache, component, cell, metric) -> float:
    """d metric / d s at s = 0 for the run whose cell is base + s * (source - base): one cell, one grad."""
    hook, index = HOOK_AND_INDEX[component]
    name = f"blocks.{cell[0]}.{hook}"
    s = torch.zeros((), dtype=model.cfg.dtype, requires_grad=True)

    def set_cell(act, hook):
        delta = torch.zeros_like(act)
        delta[index(cell)] = source_cache[name][index(cell)] - act[index(cell)].detach()
        return act + s * delta

    with torch.enable_grad():
        value = metric(model.run_with_hooks(base_tokens, fwd_hooks=[(name, set_cell)]))
        (grad,) = torch.autograd.grad(value, s)
    return grad.item()


def test_attribution_of_all_components_at_once(random_model, tokens):
    clean, corrupted = tokens
    results = attribution_patch(random_model, clean, corrupted, "kl", components="all", layer=2)
    assert set(results) == {
        "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "heads", "heads_by_pos",
        "q", "k", "v", "pattern", "neurons",
    }  # fmt: skip
    assert results["neurons"].cells[0] == (2, 0) and len(results["heads_by_pos"].cells) == 3 * 4 * 10
    assert attached_hooks(random_model) == 0


def test_attribution_correlates_with_exact_patching_and_the_helper_reports_it(random_model, tokens):
    clean, corrupted = tokens
    experiment = PatchingExperiment(random_model, clean, corrupted, ANSWERS)
    approx = experiment.attribute("heads", "logit_diff")
    exact = experiment.run("heads", "logit_diff", progress=False)
    assert approx.method == "attribution" and list(approx.table.columns) == list(exact.table.columns)
    stats = correlation(exact, approx)
    assert stats["cells"] == 12
    assert stats["pearson"] > 0.8  # heads' effects on this random model are small, hence near-linear
    same = correlation(exact, exact)
    assert same["pearson"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    cubed = exact.table.assign(value=exact.table["value"] ** 3)
    monotone = correlation(exact, _with_table(exact, cubed))
    assert monotone["spearman"] == pytest.approx(1.0) and monotone["pearson"] < 0.999


def _with_table(result, table):
    from dataclasses import replace

    return replace(result, raw=torch.tensor(table["value"].to_numpy()), normalized=False)


# ------------------------------------------------------------------------------------ known answer
@pytest.mark.skipif(
    not (DEFAULT_CHECKPOINT / "model.safetensors").exists(),
    reason="the embedded checkpoint is not trained yet",
)
def test_ioi_known_answer_on_the_embedded_model():
    from workbench.data.corpus import IOI_TEMPLATES, ioi_prompts

    model = workbench.load()
    # One template: every pair has its names at the same positions.
    prompts = ioi_prompts(8, templates=[0], corruption="s2")
    experiment = PatchingExperiment(
        model,
        [p.clean for p in prompts],
        [p.corrupted for p in prompts],
        [(p.answer, p.wrong) for p in prompts],
    )
    result = experiment.run("resid_pre", "logit_diff", progress=False)
    # The trained model does the task: the clean run names the indirect object, the corrupted run the other.
    assert result.clean_value > 1.0 and result.corrupted_value < -1.0
    grid = result.grid()
    changed = (experiment.clean_tokens != experiment.corrupted_tokens).any(0).nonzero().flatten().tolist()
    assert len(changed) == 1 and IOI_TEMPLATES[0].endswith("{S} gave a {object} to")
    s2 = changed[0]  # the second mention of the subject
    # The corruption changes only the second subject mention, so entering the first layer the whole
    # difference sits at that name; patching it there restores the clean answer.
    assert grid[0, s2] >= 0.8
    # Positions before the changed name hold identical activations in both runs (causal attention):
    # the task cannot read a difference there, and patching them must restore nothing.
    assert grid[:, :s2].abs().max() <= 0.05
    # Entering layer 0 the later words ("gave a drink to") are their own embeddings, equal in both runs:
    # nothing has carried the name to them yet, so patching them restores nothing either.
    assert grid[0, s2 + 1 :].abs().max() <= 0.05


# -------------------------------------------------------------------------------------------- errors
def test_prompts_of_different_lengths_show_both_tokenisations(random_model):
    with pytest.raises(
        ValueError, match=r"same length[\s\S]*clean: .*' w9'\][\s\S]*corrupted: .*' w5', ' w5'"
    ):
        patch(random_model, "w3 w7 w9", "w3 w5 w5 w5", "kl")
    with pytest.raises(ValueError, match="shape"):
        patch(random_model, torch.tensor([[1, 5, 6]]), torch.tensor([[1, 5]]), "kl")


def test_answers_must_be_single_tokens(random_model):
    with pytest.raises(ValueError, match="not a single token"):
        patch(random_model, "w3 w7", "w3 w8", "logit_diff", answers=(" w10 w11", " w12"))
    with pytest.raises(ValueError, match="needs answers"):
        patch(random_model, "w3 w7", "w3 w8", "logit_diff")


def test_unknown_components_metrics_and_layers_name_the_valid_ones(random_model):
    with pytest.raises(ValueError, match="resid_pre"):
        patch(random_model, "w3 w7", "w3 w8", "kl", component="resid_pr")
    with pytest.raises(ValueError, match="Did you mean 'logit_diff'"):
        patch(random_model, "w3 w7", "w3 w8", "logit_dif", answers=(" w1", " w2"))
    with pytest.raises(IndexError, match=r"0\.\.2"):
        patch(random_model, "w3 w7", "w3 w8", "kl", layers=[3])
    with pytest.raises(ValueError, match="pass layer="):
        patch(random_model, "w3 w7", "w3 w8", "kl", component="neurons")
    with pytest.raises(ValueError, match="'denoise'"):
        patch(random_model, "w3 w7", "w3 w8", "kl", direction="sideways")


def test_no_hook_stays_attached_when_a_metric_fails(random_model):
    def broken(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        patch(random_model, "w3 w7 w1", "w3 w8 w1", broken, normalize=False, max_batch=1)
    with pytest.raises(RuntimeError, match="metric failed"):
        attribution_patch(random_model, "w3 w7 w1", "w3 w8 w1", broken)
    assert attached_hooks(random_model) == 0


# ------------------------------------------------------------------------------------ result and view
def test_table_and_figure_carry_tokens_and_kv_groups(random_model, tokens):
    clean, corrupted = tokens
    experiment = PatchingExperiment(random_model, clean, corrupted, ANSWERS)
    resid = experiment.run("resid_pre", "logit_diff", progress=False)
    table = resid.table
    assert list(table.columns)[:5] == ["layer", "pos", "token", "value", "raw"]
    assert table["token"].tolist()[:10] == random_model.token_labels(clean[0])
    fig = resid.figure()
    assert len(fig.data[0].z) == 3 and len(fig.data[0].z[0]) == 10 and fig.data[0].x[4] == "4:␣w9"
    k = experiment.run("k", "logit_diff", progress=False).table
    assert k["query_heads"].tolist()[:2] == ["0,1", "2,3"]  # 4 query heads share 2 KV heads
    by_pos = experiment.run("heads_by_pos", "logit_diff", progress=False).figure()
    assert list(by_pos.data[0].y[:5]) == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]


def test_the_view_recomputes_on_each_choice_and_shows_a_cell(random_model, tokens):
    from workbench.widgets.patching import PatchingView

    clean, corrupted = tokens
    view = PatchingView(PatchingExperiment(random_model, clean, corrupted, ANSWERS))
    assert view.result.component == "resid_pre" and view.metric.options[0] == "logit_diff"
    view.component.value = "heads"
    assert view.result.component == "heads" and list(view.figure.data[0].x) == ["H0", "H1", "H2", "H3"]
    view.direction.value = "noise"
    assert view.result.direction == "noise"
    view.method.value = "attribution"
    assert view.result.method == "attribution"
    view.component.value = "resid_pre"
    view.method.value = "exact"
    predictions = view.select((0, 3))
    assert list(predictions.columns) == [
        "clean",
        "clean p",
        "corrupted",
        "corrupted p",
        "patched",
        "patched p",
    ]
    expected = PatchingExperiment(random_model, clean, corrupted, ANSWERS).predictions(
        "resid_pre", (0, 3), direction="noise"
    )
    assert predictions["patched"].tolist() == expected["patched"].tolist()
    assert "0,3" not in view.table.value and "layer 0" in view.table.value

    assert view.cell.options[0][1] is None and len(view.cell.options) == len(view.result.cells) + 1
    view.cell.value = (2, 7)  # the cell dropdown, strongest first, stands in for clicks on the heatmap
    assert view.selected == (2, 7) and "layer 2" in view.table.value
    with pytest.raises(IndexError, match="not a cell"):
        view.select((5, 0))
    assert attached_hooks(random_model) == 0
