"""Random Apertus checkpoints of any shape, written to a folder like a real one (tests and benchmarks).

Two tokenizers go with them: the shipped checkpoint's word-level tokenizer
(:func:`workbench.checkpoint.tokenizer.build_tokenizer`) over :func:`made_up_words`, as small as the
vocabulary asked for, and :func:`tekken_tokenizer`, a real 131,072-token byte-level BPE (Mistral-Nemo's
"tekken" vocabulary, shipped offline inside the ``mistral-common`` package) for tests at a real model's
scale.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import ApertusConfig, ApertusForCausalLM, PreTrainedTokenizerFast
from transformers.initialization import no_init_weights

from workbench.checkpoint.tokenizer import SPECIAL_TOKENS, build_tokenizer

#: The vocabulary size of :func:`tekken_tokenizer` (that of Apertus-8B too).
TEKKEN_VOCAB = 131072
TEKKEN_FILE = "tekken_240718.json"

#: Apertus-8B's widths (2 layers instead of 32), for :func:`make_random_checkpoint`'s ``**shape``.
APERTUS_8B_SHAPE = {
    "d_model": 4096,
    "heads": 32,
    "kv_heads": 8,
    "d_head": 128,
    "d_mlp": 21504,
    "vocab": TEKKEN_VOCAB,
}


def made_up_words(vocab_size: int) -> list[str]:
    """The words ``w0``, ``w1``... that fill a word tokenizer of ``vocab_size`` tokens after the special ones
    (``" w5"`` is one token, id 9)."""
    return [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]


def tekken_tokenizer(cache_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Mistral-Nemo's 131k byte-level BPE ("tekken"), converted by transformers from the JSON file that
    ``mistral-common`` ships (no download): ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 11, 1,000 control
    tokens, then 130,072 byte-level pieces (``Ġ`` marks a leading space, as in GPT-2).

    It adds no BOS by itself; ``HookedApertus`` and :meth:`TokenLabelledDataset.encode` prepend ``<s>``
    because ``bos_token_id`` is set. Converting takes ~10 s, so the result is saved once under
    ``cache_dir`` (default: ``$WORKBENCH_CACHE`` or the system's temporary folder) and reloaded from there;
    each call returns its own copy, so changing one (``padding_side``...) leaves the others alone.
    """
    return copy.deepcopy(_tekken_cached(str(_tekken_folder(cache_dir))))


def _tekken_folder(cache_dir: str | Path | None) -> Path:
    import mistral_common
    import transformers

    root = Path(cache_dir or os.environ.get("WORKBENCH_CACHE") or Path(tempfile.gettempdir()) / "workbench")
    # The versions are in the name: another converter or vocabulary file gets a folder of its own.
    return root / f"tekken-{mistral_common.__version__}-tf{transformers.__version__}"


@functools.lru_cache(maxsize=2)
def _tekken_cached(folder: str) -> PreTrainedTokenizerFast:
    path = Path(folder)
    if not (path / "tokenizer.json").exists():
        _convert_tekken(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def _convert_tekken(folder: Path) -> None:
    try:
        from importlib.resources import files

        source = files("mistral_common") / "data" / TEKKEN_FILE
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "tekken_tokenizer() needs the mistral-common package (it ships the vocabulary file): "
            "pip install mistral-common, or install this project with its dev extra."
        ) from error
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    tok = convert_tekken_tokenizer(str(source), chat_template="")
    tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token = "<s>", "</s>", "<unk>", "<pad>"
    tok.model_max_length = 131072
    # Written beside the final folder and renamed into place, so that two test processes building it at the
    # same time never read a half-written one.
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    tok.save_pretrained(partial)
    (partial / "chat_template.jinja").unlink(missing_ok=True)
    try:
        partial.rename(folder)
    except OSError:  # another process got there first: its copy is the same
        shutil.rmtree(partial, ignore_errors=True)


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
    dtype: torch.dtype = torch.float32,
    special_ids: dict[str, int] | None = None,
) -> ApertusForCausalLM:
    """A randomly initialised ApertusForCausalLM whose norms and xIELU scalars are perturbed too, so that no
    component is the identity it starts as.

    dtype: the weights are created in it directly (an 8B-width model in bfloat16 never exists in float32).
    special_ids: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` for the config.
    """
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
        dtype=str(dtype).removeprefix("torch."),
        **(special_ids or {}),
    )
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        model = ApertusForCausalLM(config).float()
    else:
        # Drawing 1.5 billion normals one by one takes a minute at 8B widths: skip the library's init and
        # fill the matrices from one block of normals instead (see _fill_matrices).
        with _default_dtype(dtype), no_init_weights():
            model = ApertusForCausalLM(config)
        _fill_matrices(model, config.initializer_range, gen)
    model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith("alpha_p") or name.endswith("alpha_n"):
                param.add_(0.5 * torch.randn(param.shape, generator=gen))
    return model


def _fill_matrices(model: torch.nn.Module, std: float, gen: torch.Generator, block: int = 1 << 22) -> None:
    """Every weight matrix gets N(0, std) values: windows of one block of normals, each shifted by a
    different offset (cheap, and no two rows of a matrix alike; not independent draws, which a random test
    model does not need). Vectors (norm weights, xIELU scalars) keep the values their constructors gave."""
    prime = 7919
    normals = torch.randn(block + prime, generator=gen).mul_(std)
    with torch.no_grad():
        for k, param in enumerate(p for p in model.parameters() if p.ndim >= 2):
            flat = param.view(-1)
            for i, start in enumerate(range(0, flat.numel(), block)):
                size = min(block, flat.numel() - start)
                offset = (k * 104729 + i * 613) % prime
                flat[start : start + size].copy_(normals[offset : offset + size])


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def make_random_checkpoint(folder: str | Path, *, tokenizer: str = "words", **shape) -> Path:
    """Write a random Apertus (see `random_apertus`, whose keywords ``shape`` takes) and its tokenizer to
    `folder`.

    ``tokenizer="words"``: a word tokenizer over made-up words, as many as the vocabulary holds.
    ``tokenizer="tekken"``: the 131k byte-level BPE of :func:`tekken_tokenizer`; the vocabulary is then
    131,072 (``vocab=`` may be left out) and the config's special ids are the tokenizer's.
    """
    if tokenizer not in ("words", "tekken"):
        raise ValueError(f"tokenizer must be 'words' or 'tekken', not {tokenizer!r}.")
    folder = Path(folder)
    if tokenizer == "tekken":
        if shape.setdefault("vocab", TEKKEN_VOCAB) != TEKKEN_VOCAB:
            raise ValueError(
                f"The tekken tokenizer has {TEKKEN_VOCAB} tokens; vocab={shape['vocab']} does not match "
                "(leave vocab out)."
            )
        tok = tekken_tokenizer()
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
        shape["special_ids"] = {**ids, "pad_token_id": tok.pad_token_id}
    model = random_apertus(**shape)
    if tokenizer == "words":
        tok = build_tokenizer(made_up_words(model.config.vocab_size))
    # Shards of at most 1 GB: saving copies one shard's bytes at a time, so a 3 GB model needs 1 GB spare.
    model.save_pretrained(folder, max_shard_size="1GB")
    tok.save_pretrained(folder)
    return folder
