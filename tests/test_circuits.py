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


def base_and_source(model, experiment, direction):
    """The base run's tokens and the source and base runs' caches."""
    base, source = (experiment.corrupted_tokens, experiment.clean_tokens)
    if direction == "noise":
        base, source = source, base
    with torch.no_grad():
        _, source_cache = model.run_with_cache(source)
        _, base_cache = model.run_with_cache(base)
    return base, source_cache, base_cache


def partially_patched(model, runs, sender, receiver, kind, layer, head):
    """f(s): the mean metric of the base run whose receiver reads base + s * (source - base) of the sender,
    written out with hooks. An MLP's input is the residual stream after its layer's attention (resid_mid,
    before ln2: the norm belongs to the receiver), so the MLP reads ln2(resid_mid + s * delta) while the
    skip connection keeps resid_mid; the logits read ln_final(resid_post + s * delta)."""
    base, source_cache, base_cache = runs
    delta = sender_output(model, source_cache, sender) - sender_output(model, base_cache, sender)

    def f(s):
        if kind in ("q", "k", "v"):
            logits = by_hand(
                model, base, None, source_cache, base_cache, sender, receiver, layer, kind, head, s
            )
        elif kind == "mlp":
            norm, kept = model.blocks[layer].ln2, {}

            def keep(act, hook):
                kept["mid"] = act

            def renorm(act, hook):
                x = (kept["mid"] + s * delta).float()
                scale = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.norm.variance_epsilon)
                return (x / scale).to(act.dtype)

            hooks = [(act_name("resid_mid", layer), keep), (act_name("normalized", layer, "ln2"), renorm)]
            logits = model.run_with_hooks(base, fwd_hooks=hooks)
        else:  # the logits' input
            final = act_name("resid_post", model.cfg.n_layers - 1)
            logits = model.run_with_hooks(base, fwd_hooks=[(final, lambda act, hook: act + s * delta)])
        return logit_diff(model, logits, None, ANSWERS).mean()

    return f


H = 0.01  # the finite-difference step


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_edge_attribution_is_the_derivative_on_keys_values_queries_and_mlps_of_gqa(model64, direction):
    """On the GQA model (float64 weights): each score equals the autograd derivative at s=0 of the written-out
    partial patch f(s) (to 1e-5 relative), and the central finite difference (f(H) - f(-H)) / 2H to 1e-5. The
    model's norms and softmax run in float32 (as Apertus's do), so f carries ~1e-8 of rounding: the
    difference is measured within 1.3e-6 of the scores here, which are >= 1.8e-4 (and a skip-path gradient
    into an MLP would add 0.045)."""
    assert model64.cfg.n_heads == 2 * model64.cfg.n_key_value_heads
    experiment = PatchingExperiment(model64, CLEAN, CORRUPTED, ANSWERS)
    eap = edge_attribution(experiment, "logit_diff", direction=direction, normalize=False)
    table = eap.table.set_index(["sender", "receiver"])
    cases = [
        ("L0H1", "L2KV0.k", "k", 2, 0),
        ("L1H2", "L2KV1.v", "v", 2, 1),
        ("MLP0", "L1KV0.k", "k", 1, 0),
        ("embed", "L1KV1.v", "v", 1, 1),
        ("L0H2", "L2H3.q", "q", 2, 3),
        ("L1H0", "logits", "logits", 3, -1),
        ("L2H1", "MLP2", "mlp", 2, -1),  # a head into its own layer's MLP
        ("MLP0", "MLP1", "mlp", 1, -1),
        ("embed", "MLP1", "mlp", 1, -1),
    ]
    runs = base_and_source(model64, experiment, direction)
    for sender, receiver, kind, layer, head in cases:
        f = partially_patched(model64, runs, sender, receiver, kind, layer, head)
        s = torch.zeros((), dtype=torch.float64, requires_grad=True)
        (derivative,) = torch.autograd.grad(f(s), s)
        with torch.no_grad():
            central = (f(H) - f(-H)).item() / (2 * H)
        score = table.loc[(sender, receiver), "mean"]
        assert abs(score) > 1e-4, (sender, receiver)  # a real effect, so agreement means something
        assert score == pytest.approx(derivative.item(), rel=1e-5, abs=1e-9), (sender, receiver)
        assert score == pytest.approx(central, abs=1e-5), (sender, receiver)
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


# ------------------------------------------------------------------------------------- TransformerLens
@pytest.fixture(scope="module")
def mha_checkpoint(tmp_path_factory):
    from workbench.checkpoint.synthetic import make_random_checkpoint

    folder = tmp_path_factory.mktemp("random-mha")
    return make_random_checkpoint(folder, layers=2, d_model=64, heads=4, kv_heads=4)


def test_edge_attribution_equals_transformer_lens_on_the_bridge_for_every_edge(mha_checkpoint):
    """TransformerLens's own edge attribution patching (`attribution_patch` at edge granularity, TL >= 4.3;
    it refuses GQA, hence the multi-head config) on the bridge, against ours, for every edge: q, k, v, MLP
    inputs and logits. TL reads an MLP's input gradient with a backward hook on `hook_mlp_in` (ln2's input,
    resid_mid before the norm), which sees the MLP branch only -- the same as ours. (A forward hook's
    `register_hook` on that activation would instead see the very tensor the skip connection also reads,
    and add the skip path's gradient: 0.045 off here.) TL scores per position and per pair; ours sums over
    positions, so TL's are summed over positions and averaged over pairs."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.tools.analysis.attribution_patching import (
        EdgeAttributionConfig,
        attribution_patch,
    )

    model = workbench.load(mha_checkpoint)
    bridge = TransformerBridge.boot_transformers(str(mha_checkpoint), device="cpu")
    bridge.eval()
    clean, corrupted = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    ours = edge_attribution(
        PatchingExperiment(model, clean, corrupted, ANSWERS), "logit_diff", normalize=False
    )
    ids = [(model.to_single_token(a), model.to_single_token(b)) for a, b in ANSWERS]

    def name(node):  # TL's node -> our sender / receiver name
        if node.kind in ("embed", "logits"):
            return node.kind
        if node.kind in ("mlp_out", "mlp_in"):
            return f"MLP{node.layer}"
        if node.kind == "attn_head_out":
            return f"L{node.layer}H{node.head}"
        kind = node.kind[0]  # q_input, k_input, v_input (per head: multi-head attention)
        return f"L{node.layer}{'H' if kind == 'q' else 'KV'}{node.head}.{kind}"

    theirs: dict[tuple[str, str], float] = {}
    for i, (right, wrong) in enumerate(ids):
        result = attribution_patch(
            bridge,
            clean[i : i + 1],
            corrupted[i : i + 1],
            lambda logits, r=right, w=wrong: logits[0, -1, r] - logits[0, -1, w],
            EdgeAttributionConfig(granularity="edge"),
        )
        for (writer, reader), score in result.edge_scores.items():
            key = (name(writer), name(reader))
            theirs[key] = theirs.get(key, 0.0) + score / len(ids)
    assert len(theirs) == len(ours.rows)
    worst: dict[str, float] = {}
    for i, row in ours.rows.iterrows():
        diff = abs(ours.scores[i].item() - theirs[(row.sender, row.receiver)])
        worst[row.input] = max(worst.get(row.input, 0.0), diff)
    assert set(worst) == {"q", "k", "v", "mlp", "logits"}
    assert max(worst.values()) <= 1e-4, worst
    mlp = torch.tensor([s for s, kind in zip(ours.scores.tolist(), ours.rows["input"]) if kind == "mlp"])
    assert mlp.abs().max() > 1e-2  # MLP edges carry effects well above the tolerance


def test_the_circuit_view_follows_its_controls(random_model, experiment):
    from workbench.widgets.circuits import CircuitView

    graph = Graph(random_model.cfg)
    eap = edge_attribution(experiment)
    view = CircuitView(eap, graph, count=15)
    assert len(view.circuit.edges) == 15
    view.count.value = 5
    assert len(view.circuit.edges) == 5 and view.circuit.edges == Circuit.top(eap, graph, count=5).edges
    view.inputs.value = ("k", "v")
    receivers = {r.name: r.kind for r in graph.receivers}
    assert {receivers[r] for _, r in view.circuit.edges} <= {"k", "v"}
    assert {t.name for t in view.figure.data} - {"nodes"} <= {"k", "v"}
