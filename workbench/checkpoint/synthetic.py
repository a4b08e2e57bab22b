"""Random Apertus checkpoints of any shape, written to a folder like a real one (tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import ApertusConfig, ApertusForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (" word" is one token) that prepends <s>, as Apertus's tokenizer does."""
    vocab = {w: i for i, w in enumerate(SPECIALS + [f"▁{w}" for w in words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def random_apertus(
    *,
    layers: int = 2,
    d_model: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    d_head: int | None = None,
    d_mlp: int | None = None,
    vocab: int = 96,
    n_ctx: int = 512,
    seed: int = 0,
) -> ApertusForCausalLM:
    """A randomly initialised ApertusForCausalLM whose norms and xIELU scalars are perturbed too, so that no
    component is the identity it starts as."""
    config = ApertusConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=d_mlp or 4 * d_model,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=d_head or d_model // heads,
        max_position_embeddings=n_ctx,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 12000000.0,
            "factor": 8.0,
            "original_max_position_embeddings": min(n_ctx // 2, 8192),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = ApertusForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith("alpha_p") or name.endswith("alpha_n"):
                param.add_(0.5 * torch.randn(param.shape, generator=gen))
    return model


def make_random_checkpoint(folder: str | Path, **shape) -> Path:
    """Write a random Apertus (see `random_apertus`) and a matching word tokenizer to `folder`."""
    folder = Path(folder)
    model = random_apertus(**shape)
    words = [f"w{i}" for i in range(model.config.vocab_size - len(SPECIALS))]
    model.save_pretrained(folder)
    word_tokenizer(words).save_pretrained(folder)
    return folder
