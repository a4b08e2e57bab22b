"""Sparse autoencoders: dictionary recovery, SAELens files, splicing, metrics, resumable training."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from workbench.data import corpus
from workbench.patching import PatchingExperiment, PatchResult, correlation
from workbench.probing import harvest
from workbench.sae import (
    SAE_HOOKS,
    HarvestSource,
    SAEConfig,
    SparseAutoencoder,
    TensorSource,
    evaluate_saes,
    feature_output_tokens,
    feature_statistics,
    latent_hook,
    load_sae,
    nearest_features,
    save_sae,
    splice,
    steering_hook,
    text_dataset,
    train_sae,
)

HOOK = "blocks.1.hook_resid_post"


def planted(n=40_000, d=32, m=64, active=3, seed=0):
    """Activations from a known dictionary: m unit directions in d dims, each on with probability
    active / m, magnitude uniform in [0.5, 1.5]."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(m, d, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    on = torch.rand(n, m, generator=gen) < active / m
    magnitude = torch.rand(n, m, generator=gen) + 0.5
    return (on * magnitude) @ directions, directions


@pytest.fixture(scope="module")
def resid_sae(model):
    texts = corpus.training_corpus(48, seed=3)
    _, cache = model.run_with_cache(texts, names_filter=[HOOK])
    x = cache[HOOK][:, 1:].reshape(-1, model.cfg.d_model)
    return train_sae(
        TensorSource(x, HOOK),
        architecture="topk",
        expansion=2,
        k=8,
        steps=150,
        batch_size=128,
        lr=3e-3,
        progress=False,
        device="cpu",
    ).sae


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "standard", "jumprelu"])
def test_recovers_planted_dictionary(architecture):
    # Held figures: >= 90% of the 64 planted directions have a decoder row with cosine >= 0.9 (measured:
    # 100% for every architecture, median best cosine 0.97-0.998).
    x, directions = planted()
    result = train_sae(
        TensorSource(x, HOOK),
        architecture=architecture,
        expansion=4,
        k=4,
        steps=600,
        batch_size=256,
        lr=5e-3,
        dead_after=5000,
        progress=False,
        device="cpu",
    )
    best = (result.sae.feature_directions() @ directions.T).max(0).values
    assert float((best >= 0.9).float().mean()) >= 0.9
    assert result.history.explained_variance.iloc[-1] > 0.8


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "standard", "jumprelu"])
def test_save_load_round_trip_and_saelens_fields(tmp_path, architecture):
    cfg = SAEConfig(
        d_in=16,
        d_sae=40,
        architecture=architecture,
        k=5 if "topk" in architecture else None,
        hook_name="blocks.2.attn.hook_z",
        hook_layer=2,
        model_name="apertus-tiny",
    )
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()
    save_sae(sae, tmp_path)
    raw = json.loads((tmp_path / "cfg.json").read_text())
    saelens_arch = {"batchtopk": "jumprelu"}.get(architecture, architecture)
    assert raw["architecture"] == saelens_arch
    assert (raw["d_in"], raw["d_sae"], raw["dtype"], raw["device"]) == (16, 40, "float32", "cpu")
    assert raw["apply_b_dec_to_input"] is True and raw["normalize_activations"] == "none"
    assert raw["reshape_activations"] == "hook_z"
    meta = raw["metadata"]
    assert meta["hook_name"] == raw["hook_name"] == "blocks.2.attn.hook_z"
    assert meta["model_name"] == raw["model_name"] == "apertus-tiny"
    assert meta["hook_head_index"] is None and raw["hook_layer"] == 2
    assert meta["prepend_bos"] is True and meta["sae_lens_version"].startswith("6.")
    assert raw["activation_fn_str"] == ("topk" if architecture == "topk" else "relu")
    assert raw["finetuning_scaling_factor"] is False
    assert raw.get("k") == (5 if architecture == "topk" else None)
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    expected = {"W_enc": (16, 40), "W_dec": (40, 16), "b_enc": (40,), "b_dec": (16,)}
    if saelens_arch == "jumprelu":
        expected["threshold"] = (40,)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    loaded = load_sae(tmp_path)
    assert loaded.cfg.architecture == architecture and loaded.cfg.k == cfg.k
    for name in expected:
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    x = torch.randn(3, 7, 4, 4)  # [batch, pos, head, d_head]
    assert torch.equal(loaded.encode(x), sae.encode(x)) and loaded(x).shape == x.shape


def test_splice_with_error_term_keeps_logits_and_exposes_latents(model, resid_sae):
    prompt = "When Mary and John went to the store, John gave a drink to"
    clean = model(prompt)
    name = latent_hook(resid_sae)
    before = dict(model.hook_dict)
    with splice(model, resid_sae, use_error_term=True):
        assert set(model.added_hook_points) == {f"{HOOK}.{p}" for p in SAE_HOOKS}
        logits, cache = model.run_with_cache(prompt, names_filter=lambda n: "hook_sae" in n)
    assert torch.allclose(logits, clean, atol=1e-4)
    assert model.hook_dict == before and model.added_hook_points == ()
    assert torch.equal(model(prompt), clean)  # the unspliced model again, bit for bit
    assert cache[name].shape[-1] == resid_sae.cfg.d_sae
    resid = model.run_with_cache(prompt, names_filter=[HOOK])[1][HOOK]
    assert torch.allclose(cache[name], resid_sae.encode(resid), atol=1e-5)
    assert name not in model.hook_dict and not model.hook_dict[HOOK].fwd_hooks  # restored
    with splice(model, resid_sae):  # without the error term the output changes
        assert not torch.allclose(model(prompt), clean, atol=1e-3)


IOI = corpus.ioi_prompts(3, seed=3)
RUNS = ("clean", "corrupted")


def ioi_experiment(model):
    answers = [(p.answer, p.wrong) for p in IOI]
    return PatchingExperiment(model, [p.clean for p in IOI], [p.corrupted for p in IOI], answers)


def logit_diffs(model, exp, logits):  # at each prompt's last token (the prompts are padded)
    ids = [(model.to_single_token(p.answer), model.to_single_token(p.wrong)) for p in IOI]
    return torch.stack(
        [logits[i, exp.last[i], a] - logits[i, exp.last[i], w] for i, (a, w) in enumerate(ids)]
    )


def test_sae_latents_are_a_patching_component(model, resid_sae, tmp_path):
    name = latent_hook(resid_sae)
    unspliced = ioi_experiment(model).baseline_per_pair("logit_diff", "corrupted")
    with splice(model, resid_sae, use_error_term=True):
        exp = ioi_experiment(model)
        # With the error term kept the spliced model is the model: its baselines are the unspliced ones.
        assert torch.allclose(exp.baseline_per_pair("logit_diff", "corrupted"), unspliced, atol=1e-4)
        result = exp.run(("sae_latents", resid_sae), progress=False)
        assert result.axes == ("layer", "latent") and len(result.cells) == resid_sae.cfg.d_sae
        assert result.component == f"sae_latents:{HOOK}" and result.meta["hook"] == name
        # One cell (latent f at every position, clean into corrupted) against a hand-written intervention.
        f = int(result.raw.sub(result.corrupted_value).abs().argmax())
        assert abs(result.values[f]) > 0.01
        cache = model.run_with_cache(exp.clean_tokens, attention_mask=exp.mask, names_filter=[name])[1]
        clean_latents = cache[name]

        def patch_f(acts, hook):
            acts = acts.clone()
            acts[..., f] = clean_latents[..., f]
            return acts

        hand = model.run_with_hooks(
            exp.corrupted_tokens, attention_mask=exp.mask, fwd_hooks=[(name, patch_f)]
        )
        assert torch.allclose(result.per_pair[f].float(), logit_diffs(model, exp, hand), atol=1e-5)
        batched = exp.patched_logits(result.component, (1, f))  # the result's name finds the component
        assert torch.allclose(batched, hand[torch.arange(len(IOI)), exp.last], atol=1e-4)
        # Attribution patching reads the latents too (measured: Pearson 0.97 against exact, 256 latents).
        approx = exp.attribute(("sae_latents", resid_sae))
        assert approx.cells == result.cells and correlation(result, approx)["pearson"] > 0.9
        # Every latent at every position, error term kept: the clean reconstruction plus the corrupted
        # run's own error term, which is not the clean run (the error term carries the rest).
        whole = exp.run(("hook", name), progress=False)
        resid = {
            r: model.run_with_cache(exp.tokens(r), attention_mask=exp.mask, names_filter=[HOOK])[1][HOOK]
            for r in RUNS
        }
    r_clean, r_corrupt = resid["clean"], resid["corrupted"]
    mixed = resid_sae(r_clean) + (r_corrupt - resid_sae(r_corrupt))
    hooks = [(HOOK, lambda a, hook: mixed)]
    hand = model.run_with_hooks(exp.corrupted_tokens, attention_mask=exp.mask, fwd_hooks=hooks)
    assert torch.allclose(whole.per_pair[0].float(), logit_diffs(model, exp, hand), atol=1e-4)
    assert abs(float(whole.values[0]) - 1) > 1e-3
    assert whole.figure().data[0].z.shape == (1, 1)  # one layer, one cell: the whole hook point
    saved = PatchResult.load(result.save(tmp_path / "latents.json"))
    assert saved.component == result.component and saved.sizes["latent"] == resid_sae.cfg.d_sae
    # Without the error term the model's activation is the reconstruction: all latents restore the clean run.
    with splice(model, resid_sae):
        exp = ioi_experiment(model)
        restored = exp.run(("hook", name), progress=False)
        assert float(restored.values[0]) == pytest.approx(1.0, abs=1e-5)
        by_pos = exp.run(("sae_latents_by_pos", resid_sae), positions=[-1], progress=False)
        assert by_pos.axes == ("layer", "pos", "latent") and {c[1] for c in by_pos.cells} == {exp.n_pos - 1}
        z, rows, columns, _ = by_pos.heatmap_axes()  # rows: layer x position, columns: latents
        assert z.shape == (exp.n_pos, resid_sae.cfg.d_sae) and len(rows) == exp.n_pos and columns[0] == "F0"


def test_hook_point_components_refuse_what_they_cannot_patch(model, resid_sae):
    exp = ioi_experiment(model)
    with pytest.raises(ValueError, match="No SAE is spliced"):
        exp.run(("sae_latents", resid_sae), progress=False)
    with pytest.raises(ValueError, match="Unknown hook-point component"):
        exp.run(("sae_latent", resid_sae), progress=False)
    with pytest.raises(ValueError, match="not laid out"):
        exp.run(("hook", "blocks.1.attn.hook_pattern"), progress=False)
    exp.baseline("logit_diff", "clean")  # reference runs of the unspliced model
    with splice(model, resid_sae), pytest.raises(ValueError, match="inside the `with splice"):
        exp.run(("sae_latents", resid_sae), progress=False)


def test_steering_hook_adds_the_feature_direction(model, resid_sae):
    base = "When Mary and John went to the store, John gave a drink to"
    clean = model(base)
    name, hook = steering_hook(resid_sae, 3, 5.0)
    out = model.run_with_hooks(base, fwd_hooks=[(name, hook)])
    shift = resid_sae.feature_directions()[3] * 5.0
    direct = model.run_with_hooks(base, fwd_hooks=[(HOOK, lambda a, hook: a + shift)])
    assert torch.allclose(out, direct, atol=1e-5) and not torch.allclose(out, clean, atol=1e-3)


def test_loss_recovered_equals_direct_computation(model, resid_sae):
    texts = corpus.training_corpus(6, seed=21)
    table = evaluate_saes(model, resid_sae, texts, batch_size=4, progress=False)
    row = table.loc[HOOK]

    # Direct: one text at a time (no padding), replacing every position but BOS.
    def ce(replace):
        total, n = 0.0, 0
        for text in texts:
            tok = model.to_tokens(text)
            hook = (lambda a, hook: torch.cat([a[:, :1], replace(a[:, 1:])], 1)) if replace else None
            logits = model.run_with_hooks(tok, fwd_hooks=[(HOOK, hook)] if hook else [])
            losses = F.cross_entropy(logits[0, 1:-1], tok[0, 2:], reduction="none")
            total, n = total + float(losses.sum()), n + len(losses)
        return total / n

    resid = [model.run_with_cache(model.to_tokens(t), names_filter=[HOOK])[1][HOOK][0, 1:] for t in texts]
    mean = torch.cat(resid).mean(0)
    clean, sae_ce = ce(None), ce(lambda a: resid_sae(a))
    zero, mean_ce = ce(torch.zeros_like), ce(lambda a: mean.expand_as(a))
    assert row.ce_clean == pytest.approx(clean, abs=1e-4)
    assert row.ce_sae == pytest.approx(sae_ce, abs=1e-4)
    assert row.loss_recovered == pytest.approx((zero - sae_ce) / (zero - clean), abs=1e-4)
    assert row.loss_recovered_vs_mean == pytest.approx((mean_ce - sae_ce) / (mean_ce - clean), abs=1e-4)
    assert 0 <= row.dead <= 1 and row.l0 <= 8 and row.explained_variance > 0.5


def test_training_from_harvest_resumes_exactly(model, tmp_path):
    data = text_dataset(corpus.training_corpus(40, seed=4)).encode(model.tokenizer, subtokens="every")
    h = harvest(
        model, data, tmp_path / "h", hooks=["blocks.0.mlp.hook_post"], shard_sentences=10, progress=False
    )
    source = HarvestSource(h, "blocks.0.mlp.hook_post")
    kwargs = dict(
        architecture="jumprelu",
        expansion=1,
        steps=40,
        batch_size=64,
        checkpoint_every=20,
        log_every=10,
        progress=False,
        device="cpu",
    )
    whole = train_sae(source, **kwargs)
    # An interrupted run: the same settings, its stream cut after 20 batches (its checkpoint is at step 20).
    first = train_sae(HalfSource(source, 20 * 64), folder=tmp_path / "run", **kwargs)
    assert len(first.history) == 2
    resumed = train_sae(source, folder=tmp_path / "run", **kwargs)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        assert torch.allclose(getattr(resumed.sae, name), getattr(whole.sae, name), atol=1e-5), name
    assert (tmp_path / "run" / "cfg.json").exists()
    assert load_sae(tmp_path / "run").cfg.hook_name == "blocks.0.mlp.hook_post"


class HalfSource:
    """A source whose stream stops after ``rows`` rows: an interrupted run (same fingerprint)."""

    def __init__(self, source, rows):
        self.source, self.rows = source, rows
        self.hook, self.width, self.n_rows = source.hook, source.width, source.n_rows

    def fingerprint(self):
        return self.source.fingerprint()

    def batches(self, batch_size, seed=0, start_step=0):
        for i, batch in enumerate(self.source.batches(batch_size, seed, start_step)):
            if (start_step + i) * batch_size >= self.rows:
                return
            yield batch

    def __repr__(self):
        return repr(self.source)


def test_feature_statistics_and_directions(model, resid_sae):
    texts = corpus.training_corpus(24, seed=8)
    stats = feature_statistics(model, resid_sae, texts, batch_size=8, top_k=4, progress=False)
    feature = int(stats.frequency.argmax())
    top = stats.examples(feature, "top")
    assert len(top) == 4 and list(top.value) == sorted(top.value, reverse=True)
    # The top example's value is the latent's activation on that token, and the maximum over the data.
    assert top.value.iloc[0] == pytest.approx(top.context_acts.iloc[0][top.focus.iloc[0]])
    typical = stats.examples(feature, "typical")
    assert len(typical) == 4 and (typical.value > 0).all() and typical.value.max() <= top.value.max()
    assert stats.hist[feature].sum() == round(stats.frequency[feature] * stats.n_tokens)
    out = feature_output_tokens(model, resid_sae, feature, k=5, chunk=50)
    full = resid_sae.feature_directions()[feature] * model.hf_model.model.norm.weight @ model.W_U
    assert out[out.kind == "promoted"].token_id.tolist() == full.topk(5).indices.tolist()
    near = nearest_features(resid_sae, feature, 3)
    assert feature not in near.feature.tolist() and near.cosine.is_monotonic_decreasing
