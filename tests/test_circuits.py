"""Circuits: edge patching equals a hand-written intervention, path patching equals node patching, edge
attribution equals the directional derivative (keys and values of grouped-query attention included),
statistics on known distributions, faithfulness at its two ends, files."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import attached_hooks

import workbench
from workbench import statistics
from workbench.circuits import Circuit, EdgeResult, Graph, edge_attribution, edge_patch, path_patch
from workbench.names import act_name
from workbench.patching import PatchingExperiment, PatchResult

CLEAN = ["w3 w7 w1 w9 w3 w7 w1 w2 w4", "w5 w8 w2 w6 w5 w8 w2 w1 w9"]
CORRUPTED = ["w3 w7 w5 w9 w3 w7 w0 w2 w4", "w5 w8 w3 w6 w5 w8 w4 w1 w9"]
ANSWERS = [(" w10", " w11"), (" w12", " w13")]
# A padded batch: the second pair is shorter.
PADDED = (["w3 w7 w1 w9 w3 w7 w1 w2 w4", "w5 w8 w2 w6 w5"], ["w3 w7 w5 w9 w3 w7 w0 w2 w4", "w5 w8 w3 w6 w5"])


@pytest.fixture(scope="module")
def experiment(random_model):
    return PatchingExperiment(random_model, CLEAN, CORRUPTED, ANSWERS)


@pytest.fixture(scope="module")
def model64(random_checkpoint):
    return workbench.load(random_checkpoint, dtype=torch.float64)


def sender_output(model, cache, name):
    """A sender's output from a cache, written out: the embedding, z_h W_O[h], or the MLP's output."""
    if name == "embed":
        return cache["hook_embed"]
    if name.startswith("MLP"):
        return cache[f"blocks.{int(name[3:])}.hook_mlp_out"]
    layer, head = (int(x) for x in name[1:].split("H"))
    return cache[f"blocks.{layer}.attn.hook_z"][:, :, head] @ model.blocks[layer].attn.W_O[head]


def by_hand(model, tokens, mask, source_cache, base_cache, sender, receiver, layer, kind, head, s=1.0):
    """The base run with one receiver reading the sender as in the source run: two hooks, written out."""
    delta = sender_output(model, source_cache, sender) - sender_output(model, base_cache, sender)
    block = model.blocks[layer]
    kept = {}

    def keep(act, hook):
        kept["resid"] = act

    def replace(act, hook):
        x = kept["resid"] + s * delta
        rms = torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + block.ln1.norm.variance_epsilon)
        normed = block.ln1.w * (x.float() / rms).to(x.dtype)
        proj = {"q": block.attn.attn.q_proj, "k": block.attn.attn.k_proj, "v": block.attn.attn.v_proj}[kind]
        new = proj(normed).view(act.shape)
        act = act.clone()
        act[:, :, head] = new[:, :, head]
        return act

    hooks = [(f"blocks.{layer}.hook_resid_pre", keep), (f"blocks.{layer}.attn.hook_{kind}", replace)]
    return model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)


def logit_diff(model, logits, mask, answers):
    last = mask.sum(1) - 1 if mask is not None else torch.full((logits.shape[0],), logits.shape[1] - 1)
    ids = torch.tensor([[model.to_single_token(a), model.to_single_token(b)] for a, b in answers])
    final = logits[torch.arange(logits.shape[0]), last].double()
    return final.gather(1, ids[:, :1])[:, 0] - final.gather(1, ids[:, 1:])[:, 0]


@pytest.mark.parametrize(
    "sender, receiver, kind, layer, head",
    [("L0H1", "L2KV0.k", "k", 2, 0), ("MLP0", "L1KV1.v", "v", 1, 1), ("embed", "L1H3.q", "q", 1, 3)],
)
def test_one_edge_equals_a_hand_written_two_hook_intervention_on_a_padded_gqa_batch(
    random_model, sender, receiver, kind, layer, head
):
    assert random_model.cfg.n_heads == 2 * random_model.cfg.n_key_value_heads  # grouped-query attention
    experiment = PatchingExperiment(random_model, *PADDED, ANSWERS)
    assert experiment.mask is not None
    result = edge_patch(experiment, "logit_diff", edges=[(sender, receiver)], normalize=False, progress=False)
    clean, mask = random_model.tokenize(PADDED[0])
    corrupted, _ = random_model.tokenize(PADDED[1])
    with torch.no_grad():
        _, clean_cache = random_model.run_with_cache(clean, attention_mask=mask)
        _, base_cache = random_model.run_with_cache(corrupted, attention_mask=mask)
        logits = by_hand(
            random_model, corrupted, mask, clean_cache, base_cache, sender, receiver, layer, kind, head
        )
        expected = logit_diff(random_model, logits, mask, ANSWERS)
        unpatched = logit_diff(random_model, random_model(corrupted, attention_mask=mask), mask, ANSWERS)
    assert result.rows["receiver"][0] == receiver
    assert (result.per_pair[0] - expected).abs().max() <= 1e-5
    assert (expected - unpatched).abs().max() > 1e-4  # the edge matters, so equality means something
    assert attached_hooks(random_model) == 0


def test_path_patching_to_every_receiver_equals_node_patching_of_the_head(experiment):
    paths = path_patch(experiment, "logit_diff", normalize=False, progress=False)
    heads = experiment.run("heads", "logit_diff", normalize=False, progress=False)
    table = paths.table.set_index("sender")
    ours = torch.tensor([table.loc[f"L{la}H{h}", "raw"] for la, h in heads.cells], dtype=torch.float64)
    assert (ours - heads.raw).abs().max() <= 1e-5
    assert heads.raw.std() > 1e-3
    # Receivers of one kind only: a different (smaller) effect, and restricted to q it leaves MLPs alone.
    only_q = path_patch(experiment, "logit_diff", receivers="q", normalize=False, progress=False)
    assert set(only_q.rows["input"]) <= {"q", ""}
    assert (only_q.raw - paths.raw).abs().max() > 1e-4


def test_graph_states_shared_kv_edges(random_model):
    graph = Graph(random_model.cfg)
    edges = graph.edge_table()
    k_edge = edges[(edges["sender"] == "embed") & (edges["receiver"] == "L0KV1.k")].iloc[0]
    assert k_edge["query_heads"] == "2,3"
    cfg = random_model.cfg
    senders = 1 + cfg.n_layers * (cfg.n_heads + 1)
    assert len(graph.senders) == senders
    per_layer = cfg.n_heads + 2 * cfg.n_key_value_heads
    expected = sum(
        per_layer * (1 + la * (cfg.n_heads + 1)) + 1 + la * (cfg.n_heads + 1) + cfg.n_heads
        for la in range(cfg.n_layers)
    )
    assert len(graph.edges) == expected + senders  # + every sender into the logits


def directional_derivative(model, experiment, sender, receiver, kind, layer, head, direction):
    """d metric / d s of the base run whose receiver reads base + s * (source - base) of the sender."""
    base, source = (experiment.corrupted_tokens, experiment.clean_tokens)
    if direction == "noise":
        base, source = source, base
    with torch.no_grad():
        _, source_cache = model.run_with_cache(source)
        _, base_cache = model.run_with_cache(base)
    s = torch.zeros((), dtype=model.cfg.dtype, requires_grad=True)
    if kind in ("q", "k", "v"):
        logits = by_hand(model, base, None, source_cache, base_cache, sender, receiver, layer, kind, head, s)
    else:  # the logits' input
        delta = sender_output(model, source_cache, sender) - sender_output(model, base_cache, sender)
        final = act_name("resid_post", model.cfg.n_layers - 1)

        def shift(act, hook):
            return act + s * delta

        logits = model.run_with_hooks(base, fwd_hooks=[(final, shift)])
    value = logit_diff(model, logits, None, ANSWERS).mean()
    (grad,) = torch.autograd.grad(value, s)
    return grad.item()


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_edge_attribution_is_the_directional_derivative_on_keys_values_and_queries(model64, direction):
    experiment = PatchingExperiment(model64, CLEAN, CORRUPTED, ANSWERS)
    eap = edge_attribution(experiment, "logit_diff", direction=direction, normalize=False)
    table = eap.table.set_index(["sender", "receiver"])
    cases = [
        ("L0H1", "L2KV0.k", "k", 2, 0),
        ("L1H2", "L2KV1.v", "v", 2, 1),
        ("MLP0", "L1KV0.k", "k", 1, 0),
        ("embed", "L2H3.q", "q", 2, 3),
        ("L1H0", "logits", "logits", 3, -1),
    ]
    for sender, receiver, kind, layer, head in cases:
        derivative = directional_derivative(
            model64, experiment, sender, receiver, kind, layer, head, direction
        )
        score = table.loc[(sender, receiver), "mean"]
        assert score == pytest.approx(derivative, rel=1e-5, abs=1e-9), (sender, receiver)
    # And finite differences of exact edge patching agree for small effects: central difference at s=0.
    assert attached_hooks(model64) == 0


def test_edge_attribution_tracks_exact_edge_patching(experiment):
    exact = edge_patch(experiment, "logit_diff", progress=False)
    approx = edge_attribution(experiment, "logit_diff")
    ig = edge_attribution(experiment, "logit_diff", method="eap-ig", steps=4)
    from workbench.circuits import agreement

    assert agreement(exact, approx)["spearman"] > 0.7
    assert agreement(exact, ig)["pearson"] > 0.8
    assert list(approx.table.columns) == list(exact.table.columns)


def test_faithfulness_of_no_edges_is_the_corrupted_run_and_of_all_edges_the_clean_run(
    random_model, experiment
):
    graph = Graph(random_model.cfg)
    empty = Circuit(graph, [], []).faithfulness(experiment, progress=False)
    whole = Circuit(graph, [(s.name, r.name) for s, r in graph.edges], [0.0] * len(graph.edges))
    full = whole.faithfulness(experiment, progress=False)
    assert empty["circuit"] == pytest.approx(experiment.baseline("logit_diff", "corrupted"), abs=1e-5)
    assert full["fraction"] == pytest.approx(1.0, abs=1e-5)
    assert full["normalized"] == pytest.approx(1.0, abs=1e-5) and empty["normalized"] == pytest.approx(0.0)
    top = Circuit.top(edge_attribution(experiment), graph, count=12)
    assert len(top.edges) == 12
    fig = top.figure()
    kinds = {trace.name for trace in fig.data}
    assert "nodes" in kinds and kinds - {"nodes"} <= {"q", "k", "v", "mlp", "logits"}
    with pytest.raises(ValueError, match="count=N or by threshold"):
        Circuit.top(edge_attribution(experiment), graph)


# ------------------------------------------------------------------------------------------ statistics
def test_bootstrap_intervals_cover_the_true_mean_and_p_values_are_calibrated():
    generator = torch.Generator().manual_seed(0)
    null = torch.randn(400, 20, generator=generator, dtype=torch.float64)
    table = statistics.summary(null, resamples=1000)
    covered = ((table["ci_low"] <= 0) & (table["ci_high"] >= 0)).mean()
    # Percentile bootstrap of a mean of 20 normals: ~93-95% coverage; p-values uniform under the null.
    assert 0.88 <= covered <= 0.98
    assert 0.02 <= (table["p_value"] < 0.05).mean() <= 0.09
    assert table["p_value"].between(0.4, 0.6).mean() == pytest.approx(0.2, abs=0.06)
    shifted = statistics.summary(null + 1.5, resamples=1000)
    assert (shifted["p_value"] < 0.05).all() and shifted["ci_excludes_zero"].all()
    assert table["std"].mean() == pytest.approx(1.0, abs=0.05)


def test_tables_state_their_statistics_and_figures_mark_cells(experiment):
    result = experiment.run("heads", "logit_diff", progress=False)
    table = result.table
    assert {"mean", "std", "ci_low", "ci_high", "p_value", "ci_excludes_zero"} <= set(table.columns)
    assert "bootstrap" in table.attrs["statistics"] and "2000" in table.attrs["statistics"]
    assert torch.allclose(torch.tensor(table["mean"].to_numpy()), result.values - 0.0, atol=1e-9)
    fig = result.figure(mark_significant=True)
    assert len(fig.data) == 2 and len(fig.data[1].x) == int(table["ci_excludes_zero"].sum())


# ------------------------------------------------------------------------------------------------ files
def test_results_save_and_load_equal_and_small(tmp_path, experiment):
    heads = experiment.run("heads", "logit_diff", progress=False)
    path = heads.save(tmp_path / "heads.json")
    back = PatchResult.load(path)
    pd.testing.assert_frame_equal(back.table, heads.table)
    assert back.meta["model_identity"] == heads.meta["model_identity"] and back.meta["clean"] == CLEAN
    edges = edge_attribution(experiment)
    edge_path = edges.save(tmp_path / "edges.json")
    again = EdgeResult.load(edge_path)
    pd.testing.assert_frame_equal(again.table, edges.table)
    assert torch.equal(again.per_pair, edges.per_pair)
    for p in (path, edge_path):
        assert p.stat().st_size + p.with_name(p.stem + ".meta.json").stat().st_size < 100_000
    assert b"pickle" not in path.read_bytes()
    with pytest.raises(ValueError, match="not a patching result"):
        PatchResult.load(edge_path)
