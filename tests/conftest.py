"""Shared fixtures: random Apertus checkpoints written to temporary folders, and the 131k BPE tokenizer."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on a 2-core machine: one thread each (and in the notebook kernels and Ray
    # workers they start, which read OMP_NUM_THREADS) instead of four threads fighting for two cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))
# transformers warns once per process that the fused CUDA xIELU kernel is absent on CPU: expected here.
logging.getLogger("transformers.activations").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    """A 3-layer random Apertus (4 heads, 2 KV heads) with a word tokenizer, saved like a real checkpoint."""
    from workbench.checkpoint.synthetic import make_random_checkpoint

    return make_random_checkpoint(
        tmp_path_factory.mktemp("random-apertus"), layers=3, d_model=64, heads=4, kv_heads=2
    )


@pytest.fixture(scope="session")
def tekken():
    """The 131k byte-level BPE tokenizer (built once per machine, then reloaded from the cache: ~4 s)."""
    from workbench.checkpoint.synthetic import tekken_tokenizer

    return tekken_tokenizer()


@pytest.fixture(scope="session")
def bpe_checkpoint(tmp_path_factory):
    """A cheap random Apertus (2 layers, d_model 64) with the 131k tekken tokenizer: real-text tokenization
    without real-model cost. Use it for anything that needs a byte-level BPE."""
    from workbench.checkpoint.synthetic import make_random_checkpoint

    return make_random_checkpoint(
        tmp_path_factory.mktemp("bpe-apertus"), tokenizer="tekken", layers=2, d_model=64, heads=4, kv_heads=2
    )


@pytest.fixture(scope="session")
def realdim_checkpoint(tmp_path_factory):
    """A random Apertus at Apertus-8B's widths (d_model 4096, 32 heads over 8 KV heads, head_dim 128,
    d_mlp 21504, vocab 131072) with 2 layers, bf16, and the tekken tokenizer: 2.9 GB on disk, ~30 s to build,
    3.7 GB peak memory while building. Only for the few tests that must see the real shapes (mark them
    slow)."""
    import gc

    import torch

    from workbench.checkpoint.synthetic import APERTUS_8B_SHAPE, make_random_checkpoint

    folder = make_random_checkpoint(
        tmp_path_factory.mktemp("realdim-apertus"),
        tokenizer="tekken",
        layers=2,
        dtype=torch.bfloat16,
        **APERTUS_8B_SHAPE,
    )
    gc.collect()
    return folder


@pytest.fixture(scope="session")
def random_model(random_checkpoint):
    import workbench

    return workbench.load(random_checkpoint)


@pytest.fixture(scope="module")
def model():
    """The shipped checkpoint, loaded once per test module (a module may define its own `model`)."""
    import workbench

    return workbench.load()


@pytest.fixture(scope="module")
def data():
    """18 generated part-of-speech sentences (seed 7), not encoded (a module may define its own `data`)."""
    from workbench.data.alignment import TokenLabelledDataset
    from workbench.data.corpus import tagged_sentences

    return TokenLabelledDataset.from_tagged(tagged_sentences(18, seed=7), "pos")


def attached_hooks(model) -> int:
    """Hooks attached by us: TL handles on our hook points plus raw torch hooks on our own modules."""
    handles = sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())
    raw = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.mod_dict.values())
    return handles + raw
