"""SAEs on disk in SAELens's format: a folder with ``cfg.json`` and ``sae_weights.safetensors``.

The weights file holds ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``
and, for JumpReLU, ``threshold [d_sae]`` (what SAELens's ``SAE.load_from_disk`` loads into its modules).

``cfg.json`` is written in the format of SAELens 6 (``SAE.save_model`` of sae-lens 6.x: ``architecture``,
``d_in``, ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
``reshape_activations``, ``k`` for TopK, and a ``metadata`` object with ``model_name``, ``hook_name``,
``hook_head_index``, ``context_size``, ``prepend_bos``, ``dataset_path``, ``sae_lens_version``,
``sae_lens_training_version``). The same file also carries the flat fields of the pre-6.0 format
(``model_name``, ``hook_name``, ``hook_layer``, ``hook_head_index``, ``activation_fn_str``,
``activation_fn_kwargs``, ``finetuning_scaling_factor``, ...), which readers of either format find where they
look; SAELens 6 ignores top-level keys that are not fields of its config classes.

A BatchTopK SAE is stored as SAELens stores one for inference: architecture ``"jumprelu"`` with its learnt
threshold in every latent; ``metadata.workbench`` remembers it was BatchTopK (and its k), so it loads back
here as what it was. Never pickle: JSON and safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from workbench.sae.model import SAEConfig, SparseAutoencoder

__all__ = ["CFG_FILE", "SAELENS_VERSION", "WEIGHTS_FILE", "load_sae", "sae_cfg_dict", "save_sae"]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
#: The SAELens release whose format cfg.json follows (6.x; checked against sae-lens 6.18's loader).
SAELENS_VERSION = "6.18.0"
_SAELENS_ARCH = {"standard": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}


def sae_cfg_dict(sae: SparseAutoencoder) -> dict:
    """The ``cfg.json`` contents for an SAE (see the module docstring for the fields)."""
    c = sae.cfg
    arch = _SAELENS_ARCH[c.architecture]
    metadata = {
        "model_name": c.model_name,
        "hook_name": c.hook_name,
        "hook_head_index": c.hook_head_index,
        "context_size": c.context_size,
        "prepend_bos": c.prepend_bos,
        "dataset_path": c.dataset_path,
        "sae_lens_version": SAELENS_VERSION,
        "sae_lens_training_version": SAELENS_VERSION,
        "workbench": {"architecture": c.architecture, "k": c.k, "hook_layer": c.hook_layer, **c.extra},
    }
    cfg = {
        "architecture": arch,
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": c.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if c.reshape_z else "none",
        "metadata": metadata,
        # The flat pre-6.0 fields, for older readers.
        "model_name": c.model_name,
        "hook_name": c.hook_name,
        "hook_layer": c.hook_layer,
        "hook_head_index": c.hook_head_index,
        "activation_fn_str": "topk" if arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": c.k} if arch == "topk" else {},
        "finetuning_scaling_factor": False,
        "context_size": c.context_size,
        "prepend_bos": c.prepend_bos,
        "dataset_path": c.dataset_path,
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": SAELENS_VERSION,
    }
    if arch == "topk":
        cfg["k"] = c.k
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg


def save_sae(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write ``cfg.json`` and ``sae_weights.safetensors`` into ``folder`` (created); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: getattr(sae, name).detach().cpu().contiguous() for name in ("W_enc", "W_dec", "b_enc", "b_dec")
    }
    if hasattr(sae, "threshold"):
        tensors["threshold"] = sae.threshold.detach().cpu().contiguous()
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CFG_FILE).write_text(json.dumps(sae_cfg_dict(sae), indent=2))
    return folder


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE saved here or by SAELens (its 6.x format or the older flat one): standard, topk and
    jumprelu architectures."""
    folder = Path(folder)
    for name in (CFG_FILE, WEIGHTS_FILE):
        if not (folder / name).exists():
            raise FileNotFoundError(
                f"{folder / name} is missing: an SAE folder in SAELens's format holds {CFG_FILE} and "
                f"{WEIGHTS_FILE} (write one with workbench.sae.save_sae)."
            )
    raw = json.loads((folder / CFG_FILE).read_text())
    cfg = _config_from_dict(raw)
    sae = SparseAutoencoder(cfg)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    expected = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"threshold"} if hasattr(sae, "threshold") else set())
    missing = expected - set(tensors)
    if missing:
        raise KeyError(f"{folder / WEIGHTS_FILE} lacks {sorted(missing)} for a {cfg.architecture} SAE.")
    with torch.no_grad():
        for name in expected:
            param = getattr(sae, name)
            if tensors[name].shape != param.shape:
                raise ValueError(
                    f"{name} in {folder / WEIGHTS_FILE} has shape {tuple(tensors[name].shape)}, but cfg.json "
                    f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) needs {tuple(param.shape)}."
                )
            param.copy_(tensors[name])
    return sae.to(device)


def _config_from_dict(raw: dict) -> SAEConfig:
    meta = raw.get("metadata") or {}
    ours = meta.get("workbench") or {}

    def field(name, default=None):
        # SAELens 6 keeps the model-side fields in metadata; the older format keeps them at the top.
        return meta.get(name, raw.get(name, default))

    arch = raw.get("architecture", "standard")
    if arch not in ("standard", "topk", "jumprelu"):
        raise ValueError(
            f"SAE architecture {arch!r} is not supported here (standard, topk, jumprelu and batchtopk are)."
        )
    k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k")
    if ours.get("architecture") == "batchtopk" and arch == "jumprelu":
        arch, k = "batchtopk", ours.get("k")
    if raw.get("normalize_activations", "none") not in ("none", False, None):
        raise ValueError(
            f"normalize_activations={raw['normalize_activations']!r} is not supported: fold the scaling "
            "factor into the weights first (SAELens: sae.fold_activation_norm_scaling_factor)."
        )
    hook_name = field("hook_name", field("hook_point", ""))
    extra = {key: value for key, value in ours.items() if key not in ("architecture", "k", "hook_layer")}
    return SAEConfig(
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        architecture=arch,
        k=None if k is None else int(k),
        hook_name=hook_name,
        hook_layer=int(ours.get("hook_layer", raw.get("hook_layer", _layer_of(hook_name)))),
        hook_head_index=field("hook_head_index"),
        model_name=field("model_name", "") or "",
        dtype=str(raw.get("dtype", "float32")).removeprefix("torch."),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        context_size=field("context_size"),
        prepend_bos=bool(field("prepend_bos", True)),
        dataset_path=field("dataset_path", "") or "",
        extra=extra,
    )


def _layer_of(hook_name: str) -> int:
    parts = hook_name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else 0
