"""Every hook the model shares with TransformerLens's TransformerBridge holds the same values."""

from __future__ import annotations

import pytest
import torch

import workbench


@pytest.fixture(scope="module")
def bridge(random_checkpoint):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(random_checkpoint), device="cpu")


def test_shared_hooks_equal_the_bridge(random_checkpoint, bridge):
    model = workbench.load(random_checkpoint)
    # Token ids, not texts: the bridge's tokenizer wrapper may add its own <s>.
    tokens = model.to_tokens("w3 w7 w1 w9 w3 w7 w1 w2 w4")
    with torch.no_grad():
        their_logits, theirs = bridge.run_with_cache(tokens)
        our_logits, ours = model.run_with_cache(tokens)
    shared = sorted(set(ours.keys()) & set(theirs.keys()))
    per_block = {n.split(".", 2)[2] for n in shared if n.startswith("blocks.0.")}
    # The names the issue lists must all be among those compared, so a renamed hook cannot slip through.
    assert {
        "hook_resid_pre",
        "hook_resid_mid",
        "hook_resid_post",
        "hook_attn_out",
        "hook_mlp_out",
        "ln1.hook_normalized",
        "ln2.hook_normalized",
        "attn.hook_q",
        "attn.hook_k",
        "attn.hook_v",
        "attn.hook_q_normed",
        "attn.hook_k_normed",
        "attn.hook_rot_q",
        "attn.hook_rot_k",
        "attn.hook_attn_scores",
        "attn.hook_pattern",
        "attn.hook_z",
        "mlp.hook_pre",
        "mlp.hook_post",
    } <= per_block
    assert {"hook_embed", "ln_final.hook_normalized"} <= set(shared)
    for name in shared:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape, name
        assert (a - b).abs().max().item() <= 1e-5, name
    assert (our_logits - their_logits).abs().max().item() <= 1e-5
