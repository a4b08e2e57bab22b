"""Shared fixtures: small random Apertus checkpoints written to temporary folders."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
def random_model(random_checkpoint):
    import workbench

    return workbench.load(random_checkpoint)


def attached_hooks(model) -> int:
    """Hooks attached by us: TL handles on our hook points plus raw torch hooks on our own modules."""
    handles = sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())
    raw = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.mod_dict.values())
    return handles + raw
