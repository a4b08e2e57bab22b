"""Models split over devices: the engine routes each layer's work to the layer's device.

This machine has one device (the CPU), so two checks stand in for a multi-GPU run: a per-layer `device_map`
through accelerate's dispatch (the same code path as several GPUs, every entry "cpu") must give transformers'
logits, and a model whose later layers live on PyTorch's `meta` device (shapes without data) must place every
cached activation on its own layer's device and hand the residual stream from one device to the next.
"""

from __future__ import annotations

import pytest
import torch

import workbench


def test_a_per_layer_device_map_gives_transformers_logits(random_checkpoint):
    placement = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    placement.update({f"model.layers.{i}": "cpu" for i in range(3)})
    model = workbench.load(random_checkpoint, device_map=placement)
    tokens, mask = model.tokenize(["w1 w2 w3 w4 w5", "w6 w7"])
    reference = model.hf_model(tokens, attention_mask=mask).logits
    ours, cache = model.run_with_cache(tokens, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], reference[real], atol=1e-5, rtol=1e-4)
    assert {model.layer_device(i).type for i in range(3)} == {"cpu"}


def test_each_layer_runs_on_its_own_device(random_checkpoint, monkeypatch):
    model = workbench.load(random_checkpoint)
    body = model.hf_model.model
    for module in (*body.layers[1:], body.norm, model.hf_model.lm_head):
        module.to("meta")  # layers 1.. and the head on a second device
    monkeypatch.setattr(model, "layer_device", lambda layer: model.blocks[layer].ln1.w.device)
    logits, cache = model.run_with_cache(model.to_tokens("w1 w2 w3"))
    assert logits.device.type == "meta" and logits.shape == (1, 4, model.cfg.d_vocab)
    assert cache["resid_post", 0].device.type == "cpu" and cache["pattern", 0].device.type == "cpu"
    for layer in (1, 2):
        assert cache["resid_pre", layer].device.type == "meta"
        assert cache["z", layer].device.type == "meta"


def test_offloaded_weights_are_refused_by_name(random_checkpoint):
    model = workbench.load(random_checkpoint)
    model.hf_model.model.layers[2].to("meta")
    with pytest.raises(ValueError, match="offloaded"):
        model("w1 w2")
