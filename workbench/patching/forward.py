"""The batched patched forward: variants stacked along the batch, entering at their own layer and position.

These functions drive HookedApertus's own modules (blocks, final norm, hook points) from a given layer on;
everything before a variant's patch is the base run, read from its cache instead of recomputed.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable

import torch

from workbench.hooked_model import HookedApertus
from workbench.hooked_parts import AttentionMask


def patch_hook(source: torch.Tensor, mask: torch.Tensor) -> Callable:
    """A hook replacing, in variant v's rows, the activation where mask[v] is set by the source run's."""

    def hook(act: torch.Tensor, hook) -> torch.Tensor:
        stacked = act.reshape(mask.shape[0], *source.shape)  # hook_z arrives transposed: reshape, not view
        return torch.where(mask, source[None], stacked).reshape(act.shape)

    return hook


def forward_from(model: HookedApertus, joins: Counter, entry: dict, key_mask, hooks, last, prefix=None):
    """A hooked forward whose batch grows layer by layer: joins[l] variants enter at layer l, from the base
    run's residual stream entry[l] [prompts, pos, d_model] (rows variant-major); logits as forward_with_hooks.

    The model's own blocks, entered at a layer: everything a variant would compute before its patched layer
    is the base run, already cached. With a `prefix` (a `PrefixKV`), the residual stream holds the positions
    after the prefix only, and attention reads the prefix's keys and values from the base run.
    """
    start = 0 if prefix is None else prefix.length
    n_query = next(iter(entry.values())).shape[1]
    resid, variants = None, 0
    with model.hooks(fwd_hooks=hooks):
        for layer in range(min(joins), model.cfg.n_layers):
            device = model.layer_device(layer)
            if joins.get(layer):
                new = entry[layer].to(device).repeat(joins[layer], 1, 1)
                resid = new if resid is None else torch.cat([resid.to(device), new])
                variants += joins[layer]
            resid = resid.to(device)
            km = None if key_mask is None else key_mask.to(device).bool().repeat(variants, 1)
            mask = AttentionMask(km, n_query, start + n_query, device)
            cos, sin = model.hf_model.model.rotary_emb(resid, position_ids=model.positions(mask))
            resid = model.blocks[layer](resid, cos, sin, mask, model.cfg.use_attn_result, prefix)
        return unembed(model, resid, None if last is None else last.repeat(variants))


class PrefixKV:
    """The base run's keys and values of positions 0..length-1 at every layer, put in front of a suffix
    run's own (the KV-cache interface the model's attention calls: `update(k, v, layer)`).

    `keys[l]`, `values[l]`: [prompts, pos, kv_head, d_head] as hook_rot_k / hook_v cache them; a batch of
    several variants per prompt reads them repeated.
    """

    def __init__(self, keys: dict, values: dict, length: int) -> None:
        self.keys = {layer: k[:, :length].transpose(1, 2) for layer, k in keys.items()}
        self.values = {layer: v[:, :length].transpose(1, 2) for layer, v in values.items()}
        self.length = length

    def get_seq_length(self, layer: int = 0) -> int:
        return self.length

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int):
        rows = k.shape[0] // self.keys[layer].shape[0]
        past_k = self.keys[layer].to(k.device).repeat(rows, 1, 1, 1)
        past_v = self.values[layer].to(v.device).repeat(rows, 1, 1, 1)
        return torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)


def unembed(model: HookedApertus, resid: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    normed = model.ln_final(resid.to(model.ln_final.w.device))
    if last is not None:
        normed = normed[torch.arange(normed.shape[0], device=normed.device), last.to(normed.device)]
    return model.unembed(normed)


def forward_with_hooks(model: HookedApertus, tokens, mask, hooks, last: torch.Tensor | None) -> torch.Tensor:
    """Logits of a hooked run: full [rows, pos, vocab], or only each row's `last` token [rows, vocab].

    Unembedding only the last token spares a [rows, pos, vocab] tensor (131k-word vocabularies at scale).
    """
    if last is None:
        return model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
    kept = {}

    def keep(normed, hook):
        kept["x"] = normed[torch.arange(normed.shape[0], device=normed.device), last.to(normed.device)]

    model.run_with_hooks(
        tokens, attention_mask=mask, fwd_hooks=[*hooks, ("ln_final.hook_normalized", keep)], return_type=None
    )
    return model.unembed(model.ln_final.w * kept["x"])


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 2**31


def default_max_batch(model, n_pos, spec, full_logits, memory_budget) -> int:
    """Rows per forward that fit `memory_budget` bytes (default: a quarter of free memory, at most 512)."""
    cfg = model.cfg
    budget = memory_budget if memory_budget is not None else free_memory(cfg.device) // 4
    width = 8 * cfg.d_model + 3 * cfg.d_mlp + 4 * cfg.n_heads * cfg.d_head
    if spec.name == "pattern":
        width += 3 * cfg.n_heads * n_pos  # explicit scores and patterns
    width += 4 * spec.width  # a spliced SAE's pre-activations, latents and their patched copy
    if full_logits:
        width += cfg.d_vocab
    per_row = n_pos * width * torch.finfo(cfg.dtype).bits // 8 + cfg.d_vocab * 4
    return int(max(1, min(budget // per_row, 512 if memory_budget is None else 1 << 30)))
