"""The real-scale tier: random Apertus checkpoints with the 131k byte-level BPE, cheap (d_model 64) and at
Apertus-8B's widths (2 layers, bf16)."""

from __future__ import annotations

import json

import pytest
import torch

import workbench
from workbench.data.conllu import read_conllu
from workbench.token_text import display_tokens

TEXT = "L'hôpital de Zürich ouvre « demain » 😀"


def test_bpe_checkpoint_reads_real_text(bpe_checkpoint):
    model = workbench.load(bpe_checkpoint)
    assert model.cfg.d_vocab == 131072 and model.cfg.d_model == 64
    tokens = model.to_tokens(TEXT)
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id == 1  # prepended: tekken adds no BOS itself
    shown = display_tokens(model.tokenizer, tokens[0])
    assert shown[:3] == ["<s>", "L", "'hôpital"] and "␣Zürich" in shown
    logits = model(tokens)
    assert logits.shape == (1, tokens.shape[1], 131072) and torch.isfinite(logits).all()
    config = json.loads((bpe_checkpoint / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 11)


def test_bpe_checkpoint_encodes_a_treebank(bpe_checkpoint):
    from pathlib import Path

    model = workbench.load(bpe_checkpoint)
    data = read_conllu(Path(__file__).parent / "fixtures" / "de_quotes.conllu", "upos")
    encoded = data.encode(model.tokenizer, tokenize="words")
    assert encoded.n_labelled == 22 and encoded.pad_id == 11
    batch = encoded.batch(range(len(encoded)))
    assert model(batch["input_ids"], attention_mask=batch["attention_mask"]).shape[-1] == 131072


@pytest.mark.slow
def test_realdim_checkpoint_has_apertus_8b_widths(realdim_checkpoint):
    size = sum(f.stat().st_size for f in realdim_checkpoint.glob("*.safetensors"))
    assert 2.9e9 < size < 3.1e9  # 1.51 billion bf16 parameters
    model = workbench.load(realdim_checkpoint, dtype="bfloat16")
    cfg = model.cfg
    assert (
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
        cfg.n_key_value_heads,
        cfg.d_head,
        cfg.d_mlp,
        cfg.d_vocab,
    ) == (
        2,
        4096,
        32,
        8,
        128,
        21504,
        131072,
    )
    assert model.W_E.dtype == torch.bfloat16
    tokens = model.to_tokens(TEXT)
    with torch.inference_mode():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("mlp.hook_post"))
    assert logits.shape == (1, tokens.shape[1], 131072) and torch.isfinite(logits.float()).all()
    assert cache["blocks.1.mlp.hook_post"].shape == (1, tokens.shape[1], 21504)
