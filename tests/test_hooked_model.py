"""The hooked model computes exactly what transformers' Apertus computes; every hook reads and rewrites."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import attached_hooks
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.activations import XIELUActivation

import workbench
from workbench import HookedApertus, NotApertusError
from workbench.checkpoint.synthetic import make_random_checkpoint, random_apertus
from workbench.hooked_parts import masked_scores, run_xielu

TOL = 1e-5


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def reference(hf, tokens, mask=None, eager=True):
    """transformers' own forward, with the same positions a padded batch needs."""
    hf.config._attn_implementation = "eager" if eager else "sdpa"
    position_ids = None if mask is None else (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(
            tokens,
            attention_mask=mask,
            position_ids=position_ids,
            output_hidden_states=True,
            output_attentions=eager,
        )


@st.composite
def configurations(draw):
    heads = draw(st.sampled_from([1, 2, 4, 6, 8]))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    d_head = draw(st.sampled_from([4, 8, 16, 32]))
    return dict(
        layers=draw(st.integers(1, 3)),
        heads=heads,
        kv_heads=kv_heads,
        d_head=d_head,
        d_model=draw(st.sampled_from([16, 32, 48])),
        d_mlp=draw(st.sampled_from([32, 64])),
        vocab=50,
        n_ctx=64,
        seed=draw(st.integers(0, 10_000)),
    )


@settings(max_examples=30, deadline=None)
@given(
    shape=configurations(),
    lengths=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    left=st.booleans(),
    data=st.data(),
)
def test_matches_transformers_on_random_configurations(shape, lengths, left, data):
    hf = random_apertus(**shape)
    model = HookedApertus(hf, tokenizer=None)
    width = max(lengths)
    tokens = torch.tensor(
        data.draw(st.lists(st.integers(0, 49), min_size=width * len(lengths), max_size=width * len(lengths)))
    )
    tokens = tokens.view(len(lengths), width)
    mask = torch.zeros_like(tokens)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1 if left else 0
        if not left:
            mask[row, :n] = 1
    real = mask.bool()
    padded = not bool(real.all())

    logits, cache = model.run_with_cache(tokens, attention_mask=mask if padded else None)
    ref = reference(hf, tokens, mask if padded else None)
    assert max_diff(logits[real], ref.logits[real]) <= TOL
    for layer in range(shape["layers"]):
        assert max_diff(cache[f"blocks.{layer}.hook_resid_pre"][real], ref.hidden_states[layer][real]) <= TOL
        # Attention rows of real queries; padded queries see nothing real and are left undefined.
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].transpose(1, 2)[real]
        assert max_diff(pattern, ref.attentions[layer].transpose(1, 2)[real]) <= TOL
    final = model.hf_model.model.norm.weight * cache["ln_final.hook_normalized"]
    assert max_diff(final[real], ref.hidden_states[-1][real]) <= TOL

    # The fused path (no pattern hook) against transformers' SDPA forward.
    fast = model(tokens, attention_mask=mask if padded else None)
    assert (
        max_diff(fast[real], reference(hf, tokens, mask if padded else None, eager=False).logits[real]) <= TOL
    )


def test_bfloat16_within_bfloat16_tolerance():
    hf32 = random_apertus(layers=2, d_model=64, heads=4, kv_heads=2, seed=3)
    tokens = torch.randint(4, 96, (2, 20))
    with torch.no_grad():
        exact = hf32(tokens).logits
    hf16 = random_apertus(layers=2, d_model=64, heads=4, kv_heads=2, seed=3).to(torch.bfloat16)
    ours = HookedApertus(hf16, None)(tokens).float()
    theirs = reference(hf16, tokens, eager=False).logits.float()
    scale = exact.abs().max().item()
    # bfloat16 keeps 8 bits of mantissa: both runs sit a few bf16 ulps from the float32 truth and each other.
    assert max_diff(ours, theirs) <= 0.02 * scale
    assert max_diff(ours, exact) <= 0.05 * scale
    assert max_diff(ours, exact) <= 2 * max_diff(theirs, exact) + 0.01 * scale


def test_padding_left_or_right_gives_each_prompt_its_own_activations(random_model):
    texts = ["w1 w2 w3 w4 w5 w6 w7", "w8 w9", "w10 w11 w12 w13"]
    alone = [random_model.run_with_cache(t)[1] for t in texts]
    for side in ("left", "right"):
        tokens = random_model.to_tokens(texts, padding_side=side)
        mask = (tokens != random_model.tokenizer.pad_token_id).long()
        _, batch = random_model.run_with_cache(tokens, attention_mask=mask)
        for row, single in enumerate(alone):
            n = int(mask[row].sum())
            span = slice(tokens.shape[1] - n, None) if side == "left" else slice(0, n)
            for name, value in single.items():
                got = batch[name][row]
                if name.endswith(("hook_pattern", "hook_attn_scores")):
                    got = got[:, span, span]
                    value = value[0]
                    if name.endswith("hook_attn_scores"):
                        got, value = got.clamp(min=-1e9), value.clamp(min=-1e9)
                elif name.endswith(("hook_q_normed", "hook_k_normed")):
                    got, value = got[:, span], value[0]
                else:
                    got, value = got[span], value[0]
                assert max_diff(got, value) <= TOL, (side, name)


def test_text_list_and_token_inputs_agree(random_model):
    text = "w3 w1 w4 w1 w5"
    tokens = random_model.to_tokens(text)
    assert tokens[0, 0].item() == random_model.tokenizer.bos_token_id
    assert random_model.to_str_tokens(text) == ["<s>", " w3", " w1", " w4", " w1", " w5"]
    # The word tokenizer (the shipped one's builder) keeps each token's leading space when decoding.
    assert random_model.to_string(tokens[0, 1:]) == " " + text
    by_text, by_list, by_tokens = random_model(text), random_model([text]), random_model(tokens)
    assert torch.equal(by_text, by_tokens) and torch.equal(by_list, by_tokens)


def test_loss_matches_transformers(random_model):
    tokens = random_model.to_tokens("w1 w2 w3 w4 w5 w6")
    with torch.no_grad():
        expected = random_model.hf_model(tokens, labels=tokens).loss
    assert abs(random_model(tokens, return_type="loss").item() - expected.item()) <= TOL


def test_stop_at_layer_returns_the_residual_entering_that_layer(random_model):
    tokens = random_model.to_tokens("w1 w2 w3")
    _, cache = random_model.run_with_cache(tokens)
    assert max_diff(random_model(tokens, stop_at_layer=2), cache["blocks.2.hook_resid_pre"]) <= TOL
    with pytest.raises(IndexError, match="out of range"):
        random_model(tokens, stop_at_layer=7)


def every_hook_name(model):
    return [n for n in model.hook_dict if not n.endswith("hook_result")]


def test_every_hook_rewrite_flows_on(random_model):
    tokens = random_model.to_tokens("w5 w9 w2 w7 w5 w9")
    clean = random_model(tokens)
    random_model.set_use_attn_result(True)
    try:
        assert torch.allclose(
            random_model(tokens), clean, atol=TOL
        )  # per-head results sum to the same output
        for name in random_model.hook_dict:
            identity = random_model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: x)])
            assert torch.allclose(identity, clean, atol=TOL), name
            # Noise, not a rescaling: QK-norm and RMSNorm would undo a uniform scale.
            noisy = lambda x, hook: x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # noqa: E731
            rewritten = random_model.run_with_hooks(tokens, fwd_hooks=[(name, noisy)])
            assert max_diff(rewritten, clean) > 1e-3, f"rewriting {name} changed nothing downstream"
    finally:
        random_model.set_use_attn_result(False)
    assert attached_hooks(random_model) == 0


def test_run_with_cache_returns_an_activation_cache(random_model):
    tokens = random_model.to_tokens("w1 w2 w3 w4")
    logits, cache = random_model.run_with_cache(tokens, names_filter=lambda n: n.endswith("resid_post"))
    assert sorted(cache.keys()) == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert torch.equal(cache["resid_post", 1], cache["blocks.1.hook_resid_post"])
    assert cache["blocks.0.hook_resid_post"].shape == (1, 5, 64)
    _, single = random_model.run_with_cache(
        tokens, names_filter="blocks.0.attn.hook_pattern", remove_batch_dim=True
    )
    assert single["blocks.0.attn.hook_pattern"].shape == (4, 5, 5)
    # hook_result is opt-in, as in TransformerLens: the full cache leaves it out unless asked for.
    assert not any(k.endswith("hook_result") for k in random_model.run_with_cache(tokens)[1])


def test_shapes_follow_transformer_lens(random_model):
    _, cache = random_model.run_with_cache("w1 w2 w3 w4")
    b, p, h, kv, d = 1, 5, 4, 2, 16
    expected = {
        "hook_embed": (b, p, 64),
        "blocks.0.attn.hook_q": (b, p, h, d),
        "blocks.0.attn.hook_k": (b, p, kv, d),
        "blocks.0.attn.hook_v": (b, p, kv, d),
        "blocks.0.attn.hook_rot_q": (b, p, h, d),
        "blocks.0.attn.hook_rot_k": (b, p, kv, d),
        "blocks.0.attn.hook_q_normed": (b, h, p, d),
        "blocks.0.attn.hook_k_normed": (b, kv, p, d),
        "blocks.0.attn.hook_attn_scores": (b, h, p, p),
        "blocks.0.attn.hook_pattern": (b, h, p, p),
        "blocks.0.attn.hook_z": (b, p, h, d),
        "blocks.0.mlp.hook_pre": (b, p, 256),
        "blocks.0.mlp.hook_post": (b, p, 256),
        "blocks.0.ln1.hook_scale": (b, p, 1),
        "ln_final.hook_normalized": (b, p, 64),
    }
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name


def test_sdpa_unless_a_pattern_hook_watches_that_layer(random_model, monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    tokens = random_model.to_tokens("w1 w2 w3 w4")
    random_model(tokens)
    assert len(calls) == 3
    calls.clear()
    random_model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda x, hook: None)])
    assert len(calls) == 2
    calls.clear()
    random_model.run_with_cache(
        tokens, names_filter=lambda n: "resid" in n or "scores" in n and "blocks.2" in n
    )
    assert len(calls) == 2


def test_xielu_parameters_are_what_the_activation_applies(random_model):
    table = random_model.xielu_parameters()
    assert list(table.columns) == ["alpha_p", "alpha_n", "beta", "eps"] and len(table) == 3
    x = torch.linspace(-12, 6, 1001)
    for layer, row in table.iterrows():
        act = random_model.hf_model.model.layers[layer].mlp.act_fn
        curve = torch.where(
            x > 0,
            row.alpha_p * x * x + row.beta * x,
            row.alpha_n * (torch.expm1(torch.clamp(x, max=row.eps)) - x) + row.beta * x,
        )
        assert max_diff(curve, act(x)) <= 1e-5
    assert table["alpha_p"].nunique() == 3  # the random checkpoint perturbs each layer differently


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_in_place_xielu_is_bit_for_bit_the_module(x_dtype, param_dtype):
    act = XIELUActivation(alpha_p_init=0.6, alpha_n_init=1.3, beta=0.4, eps=-1e-6, dtype=param_dtype)
    x = torch.cat([torch.linspace(-30, 8, 4000), torch.tensor([0.0, -1e-6, -2e-6, 1e-7])]).to(x_dtype)
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))].view(2, -1, 1)
    with torch.no_grad():
        expected = act(x)
        got = run_xielu(act, x)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)
    # With a gradient wanted the module runs itself, so backward works and agrees.
    x = x.float().requires_grad_()
    run_xielu(act, x).sum().backward()
    got_grad = x.grad.clone()
    x.grad = None
    act(x).sum().backward()
    assert torch.equal(got_grad, x.grad)


def test_masked_scores_equal_the_eager_formula():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 4, 7, 16, generator=g), torch.randn(3, 4, 9, 16, generator=g)
    allowed = torch.rand(3, 1, 7, 9, generator=g) > 0.3
    for mask in (allowed, allowed[:1]):
        additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
        expected = torch.matmul(q, k.transpose(2, 3)) * 0.25 + additive
        got = masked_scores(q, k, 0.25, additive)
        assert max_diff(got, expected) <= 1e-6 and torch.equal(
            got == torch.finfo(torch.float32).min, ~mask.expand_as(got)
        )


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_hook_names_suggest_the_closest(random_model):
    tokens = random_model.to_tokens("w1 w2")
    with pytest.raises(KeyError, match=r"blocks\.1\.hook_resid_pre"):
        random_model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pr", lambda x, hook: x)])
    with pytest.raises(KeyError, match=r"blocks\.0\.attn\.hook_pattern"):
        random_model.run_with_cache(
            tokens, names_filter=["blocks.0.hook_resid_post", "blocks.0.attn.hook_patern"]
        )
    with pytest.raises(KeyError, match="layer 9 is out of range.*3 layers"):
        random_model.run_with_hooks(tokens, fwd_hooks=[("blocks.9.hook_resid_pre", lambda x, hook: x)])
    with pytest.raises(ValueError, match="set_use_attn_result"):
        random_model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_result"])
    with pytest.raises(IndexError, match="4 heads"):
        random_model.check_head(4)
    assert attached_hooks(random_model) == 0


def test_bad_tokens_and_prompts_get_clear_errors(random_model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        random_model(torch.tensor([[1, 2, 96]]))
    with pytest.raises(ValueError, match="context is 512"):
        random_model(torch.ones(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        random_model("")
    with pytest.raises(ValueError, match="[Ee]mpty"):
        random_model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="one 0/1 entry per token"):
        random_model(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="not a single token"):
        random_model.to_single_token(" w1 w2")


def test_a_raising_hook_leaves_nothing_attached(random_model):
    tokens = random_model.to_tokens("w1 w2 w3")
    clean = random_model(tokens)

    def broken(x, hook):
        raise RuntimeError("boom")

    hooks = [("blocks.0.hook_resid_post", lambda x, hook: x * 0), ("blocks.1.attn.hook_pattern", broken)]
    with pytest.raises(RuntimeError, match="boom"):
        random_model.run_with_hooks(tokens, fwd_hooks=hooks)
    with pytest.raises(RuntimeError, match="boom"):
        random_model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_z"), broken)])
    with (
        pytest.raises(RuntimeError, match="boom"),
        random_model.hooks(fwd_hooks=[("blocks.2.hook_mlp_out", broken)]),
    ):
        random_model.run_with_cache(tokens)
    assert attached_hooks(random_model) == 0
    assert torch.equal(random_model(tokens), clean)


def test_added_hook_points_are_ordinary_and_removed_cleanly(random_model):
    from transformer_lens.hook_points import HookPoint

    model, tokens = random_model, random_model.to_tokens("w1 w2 w3")
    clean, before = model(tokens), dict(model.hook_dict)
    point = HookPoint()

    def doubled(resid, hook):  # the added point fires where its owner calls it: here inside a hook
        return point(resid * 2)

    with model.extra_hook_points({"blocks.0.hook_resid_post.extra": point}):
        assert model.added_hook_points == ("blocks.0.hook_resid_post.extra",)
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", doubled)]):
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(".extra"))
            resid = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")[1]
            assert torch.equal(cache["blocks.0.hook_resid_post.extra"], resid["blocks.0.hook_resid_post"])
            zeroed = model.run_with_hooks(
                tokens, fwd_hooks=[("blocks.0.hook_resid_post.extra", lambda x, hook: x * 0)]
            )
        assert not torch.allclose(zeroed, clean)
        with pytest.raises(ValueError, match="already a hook point"):
            model.add_hook_point("blocks.0.hook_resid_post", HookPoint())
        with pytest.raises(ValueError, match="own hook points"):
            model.remove_hook_point("blocks.0.hook_resid_pre")
        with pytest.raises(TypeError, match="HookPoint"):
            model.add_hook_point("other", torch.nn.Identity())
        point.add_hook(lambda x, hook: x, is_permanent=True)
    assert model.hook_dict == before and model.added_hook_points == () and not point.fwd_hooks
    assert "blocks.0.hook_resid_post.extra" not in model.mod_dict and torch.equal(model(tokens), clean)
    bad = {"fine": HookPoint(), "hook_embed": HookPoint()}  # a bad name adds none of the others
    with pytest.raises(ValueError, match="already a hook point"), model.extra_hook_points(bad):
        pass
    assert model.hook_dict == before


# ------------------------------------------------------------------------------------------- loading
def test_load_options_on_a_local_folder(random_checkpoint):
    tokens = torch.tensor([[1, 5, 6, 7, 8]])
    base = workbench.load(random_checkpoint)
    assert not any(p.requires_grad for p in base.parameters())
    half = workbench.load(random_checkpoint, dtype=torch.bfloat16)
    assert half.cfg.dtype == torch.bfloat16 and half(tokens).dtype == torch.bfloat16
    assert workbench.load(random_checkpoint, dtype="bfloat16").W_E.dtype == torch.bfloat16
    mapped = workbench.load(random_checkpoint, device_map="auto")
    assert torch.allclose(mapped(tokens), base(tokens), atol=TOL)
    assert workbench.load(random_checkpoint, device="cpu").cfg.device.type == "cpu"
    with pytest.raises(ValueError, match="not both"):
        workbench.load(random_checkpoint, device="cpu", device_map="auto")


def test_load_refuses_what_is_not_apertus(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(tmp_path / "llama")
    with pytest.raises(NotApertusError, match="'llama' checkpoint.*not Apertus"):
        workbench.load(tmp_path / "llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        workbench.load(tmp_path / "empty")


def test_token_classification_checkpoints_load_too(tmp_path):
    from transformers import ApertusForTokenClassification

    folder = make_random_checkpoint(tmp_path / "lm", layers=2)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["ApertusForTokenClassification"], num_labels=5)
    torch.manual_seed(0)
    from transformers import ApertusConfig

    tagger = ApertusForTokenClassification(
        ApertusConfig(**{k: v for k, v in config.items() if k != "architectures"})
    )
    tagger.save_pretrained(tmp_path / "tagger")
    model = workbench.load(tmp_path / "tagger", tokenizer=workbench.load(folder).tokenizer)
    tokens = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        expected = tagger.eval()(tokens).logits
    assert model.cfg.original_architecture == "ApertusForTokenClassification"
    assert model(tokens).shape == (1, 4, 5)
    assert max_diff(model(tokens), expected) <= TOL
