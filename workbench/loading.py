"""Loading any Apertus checkpoint (hub id or local folder) as a `HookedApertus`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers import (
    ApertusForCausalLM,
    ApertusForTokenClassification,
    AutoConfig,
    AutoTokenizer,
)

from workbench.checkpoint import DEFAULT_CHECKPOINT
from workbench.hooked_model import HookedApertus


class NotApertusError(ValueError):
    """The checkpoint is not an Apertus model."""


class MissingWeightsError(ValueError):
    """The checkpoint's weights do not cover the model its config describes (or hold weights it has no
    place for)."""


def load(
    source: str | Path | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    tokenizer: Any = None,
    allow_missing_weights: bool = False,
    **hf_kwargs: Any,
) -> HookedApertus:
    """Load an Apertus checkpoint as a hooked model.

    source: a hub id (e.g. "swiss-ai/Apertus-8B-Instruct-2509") or a local folder with config.json,
        safetensors weights and tokenizer files; None loads the small checkpoint shipped with the workbench.
    dtype, device_map, **hf_kwargs: passed to transformers' `from_pretrained` unchanged (so bf16 and
        device_map="auto" behave as in transformers); device: where to put the whole model afterwards.
    allow_missing_weights: a checkpoint whose weights lack some of the model's (a layer missing from the
        safetensors, a config with more layers than the weights) or hold unexpected ones is an error listing
        them, since transformers would fill the gaps with random values; True accepts it (random weights).
    The weights are frozen (requires_grad=False): interpretability reads and rewrites activations, and a
    frozen model builds no autograd graph unless an activation asks for one.
    """
    if device is not None and device_map is not None:
        raise ValueError(
            "Pass either device= (one device) or device_map= (transformers' placement), not both."
        )
    source = DEFAULT_CHECKPOINT if source is None else source
    config = _apertus_config(source, hf_kwargs)
    architectures = config.architectures or []
    model_class = (
        ApertusForTokenClassification
        if "ApertusForTokenClassification" in architectures
        else ApertusForCausalLM
    )
    if dtype is not None:
        hf_kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if device_map is not None:
        hf_kwargs["device_map"] = device_map
    hf_model, info = model_class.from_pretrained(source, output_loading_info=True, **hf_kwargs)
    if not allow_missing_weights:
        _check_loading_info(source, info)
    if device is not None:
        hf_model.to(device)
    hf_model.eval().requires_grad_(False)
    tokenizer_given = tokenizer is not None
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(source, **_tokenizer_kwargs(hf_kwargs))
    model = HookedApertus(hf_model, tokenizer, name=str(source))
    if not tokenizer_given and all(_plain(v) for v in hf_kwargs.values()):
        # What a remote worker needs to load a replica (workbench.executors.RayExecutor).
        spec = {"source": str(source), "device": None if device is None else str(device)}
        spec.update({k: (str(v).removeprefix("torch.") if k == "dtype" else v) for k, v in hf_kwargs.items()})
        model.load_spec = spec
    return model


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, dict, torch.dtype))


def _check_loading_info(source: Any, info: dict) -> None:
    missing, unexpected = sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", []))
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        layers = sorted({int(k.split(".")[2]) for k in missing if re.match(r"model\.layers\.\d+\.", k)})
        if layers:
            parts.append(f"weights of layer(s) {', '.join(map(str, layers))} are missing")
        parts.append(
            f"{len(missing)} weights of the model are missing from the checkpoint ({_listed(missing)})"
        )
    if unexpected:
        parts.append(
            f"{len(unexpected)} weights in the checkpoint have no place in the model ({_listed(unexpected)})"
        )
    raise MissingWeightsError(
        f"{source}: {'; '.join(parts)}. transformers would initialise what is missing at random. Check that "
        "config.json (num_hidden_layers, sizes) matches the safetensors files, or pass "
        "allow_missing_weights=True if you know why they differ."
    )


def _listed(keys: list[str], shown: int = 8) -> str:
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def _apertus_config(source: str | Path, hf_kwargs: dict) -> Any:
    local = Path(source)
    if local.exists() and local.is_dir() and not (local / "config.json").exists():
        raise FileNotFoundError(
            f"{local} has no config.json: point load() at a folder made by save_pretrained "
            "(config.json, model.safetensors, tokenizer files) or at a hub id."
        )
    config = AutoConfig.from_pretrained(source, **_tokenizer_kwargs(hf_kwargs))
    if config.model_type != "apertus":
        raise NotApertusError(
            f"{source} is a {config.model_type!r} checkpoint ({', '.join(config.architectures or ['?'])}), "
            "not Apertus: the workbench instruments ApertusForCausalLM / ApertusForTokenClassification only. "
            "Use an Apertus checkpoint, e.g. 'swiss-ai/Apertus-8B-2509', or load() for the shipped one."
        )
    return config


def _tokenizer_kwargs(hf_kwargs: dict) -> dict:
    keys = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code")
    return {k: hf_kwargs[k] for k in keys if k in hf_kwargs}
