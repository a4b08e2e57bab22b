"""The batched patched forward: variants stacked along the batch, entering at their own layer and position.

These functions drive HookedApertus's own modules (blocks, final norm, hook points) from a given layer on;
everything before a variant's patch is the base run, read from its cache instead of recomputed.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable

import torch

from workbench.hooked_model import HookedApertus, _Masks, _output_head


def patch_hook(source: torch.Tensor, mask: torch.Tensor) -> Callable:
    """A hook replacing, in variant v's rows, the activation where mask[v] is set by the source run's."""

    def hook(act: torch.Tensor, hook) -> torch.Tensor:
        stacked = act.reshape(mask.shape[0], *source.shape)  # hook_z arrives transposed: reshape, not view
        return torch.where(mask, source[None], stacked).reshape(act.shape)

    return hook


def forward_from(model: HookedApertus, joins: Counter, entry: dict, key_mask, hooks, last, start: int = 0):
    """A hooked forward whose batch grows layer by layer: joins[l] variants enter at layer l, from the base
    run's residual stream entry[l] [prompts, pos, d_model] (rows variant-major); logits as forward_with_hooks.

    The same modules as HookedApertus.forward, entered at a layer: everything a variant would compute before
    its patched layer is the base run, already cached. With `start` > 0 the residual stream holds positions
    start.. only, and the hooks must supply the earlier keys and values (see `prepend_hook`).
    """
    body, cfg = model.hf_model.model, model.cfg
    n_pos = next(iter(entry.values())).shape[1] + start
    device = body.embed_tokens.weight.device
    if key_mask is None:
        position_ids = torch.arange(start, n_pos, device=device)[None]
    else:
        position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    resid, variants = None, 0
    with model.hooks(fwd_hooks=hooks):
        for layer in range(min(joins), cfg.n_layers):
            device = model._layer_devices[layer]
            if joins.get(layer):
                new = entry[layer].to(device).repeat(joins[layer], 1, 1)
                resid = new if resid is None else torch.cat([resid.to(device), new])
                variants += joins[layer]
            resid = resid.to(device)
            cos, sin = body.rotary_emb(resid, position_ids=position_ids.to(device))
            if key_mask is not None:
                cos, sin = cos.repeat(variants, 1, 1), sin.repeat(variants, 1, 1)
                masks = _Masks(key_mask.to(device).bool().repeat(variants, 1), n_pos, device)
            else:
                masks = SuffixMasks(start, n_pos, device) if start else _Masks(None, n_pos, device)
            resid = model.blocks[layer](resid, body.layers[layer], cos, sin, masks, cfg.use_attn_result)
        return unembed(model, resid, None if last is None else last.repeat(variants))


class SuffixMasks:
    """The masks of queries start..n-1 over keys 0..n-1, in the interface of hooked_model._Masks.

    `padded` routes attention through the explicit-mask path, which (unlike is_causal) accepts fewer queries
    than keys; the mask is causal aligned to the last key.
    """

    padded = True

    def __init__(self, start: int, length: int, device: torch.device) -> None:
        self.start, self.length, self.device = start, length, device
        query = torch.arange(start, length, device=device)[:, None]
        self.boolean = (torch.arange(length, device=device)[None] <= query)[None, None]

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        zero = torch.zeros((), dtype=dtype, device=self.device)
        return torch.where(self.boolean, zero, torch.finfo(dtype).min)

    def to(self, device: torch.device) -> SuffixMasks:
        return SuffixMasks(self.start, self.length, device)


def prepend_hook(prefix: torch.Tensor) -> Callable:
    """A hook on hook_rot_k / hook_v that puts the base run's earlier positions in front of a suffix run's."""

    def hook(act: torch.Tensor, hook) -> torch.Tensor:
        rows = act.shape[0] // prefix.shape[0]
        return torch.cat([prefix.to(act.device).repeat(rows, 1, 1, 1), act], dim=1)

    return hook


def unembed(model: HookedApertus, resid: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    body, head = model.hf_model.model, _output_head(model.hf_model)
    normed = model.ln_final(resid.to(body.norm.weight.device), body.norm)
    if last is not None:
        normed = normed[torch.arange(normed.shape[0], device=normed.device), last.to(normed.device)]
    return head(normed.to(head.weight.device))


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
    norm, head = model.hf_model.model.norm, _output_head(model.hf_model)
    return head((norm.weight * kept["x"]).to(head.weight.device))


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
    if full_logits:
        width += cfg.d_vocab
    per_row = n_pos * width * torch.finfo(cfg.dtype).bits // 8 + cfg.d_vocab * 4
    return int(max(1, min(budget // per_row, 512 if memory_budget is None else 1 << 30)))
