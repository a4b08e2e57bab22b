"""The hooked parts of an Apertus decoder: each holds its transformers module and reads its weights.

A part keeps a plain reference to its transformers twin (`attention_layernorm`, `self_attn`, `mlp`, ...):
the parameters stay registered once, under `HookedApertus.hf_model`, so `.to()`, `state_dict()` and
`from_pretrained` see one copy. The weight views (`W_Q`, `W_O`, `W_in`, `W_out`, ...) are views of the
checkpoint's tensors in TransformerLens's layouts, never copies.
"""

from __future__ import annotations

import functools
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint
from transformers.activations import XIELUActivation
from transformers.models.apertus.modeling_apertus import apply_rotary_pos_emb, repeat_kv


def hold(part: nn.Module, name: str, module: nn.Module) -> None:
    """Keep `module` on `part` without registering it (its parameters are registered once, on hf_model)."""
    object.__setattr__(part, name, module)


class CheckedHookPoint(HookPoint):
    """A TransformerLens HookPoint whose forward hooks must return a tensor like the one they were given.

    A hook that returns another shape, dtype or device would otherwise flow on silently (a transposed
    `hook_z` reshapes into wrong logits; an int64 tensor truncates activations). With `check_finite` set
    (`model.set_check_finite(True)`), a hook that introduces NaN or inf raises too.
    """

    check_finite = False

    def add_hook(self, hook, dir="fwd", is_permanent=False, level=None, prepend=False, alias_names=None):
        if dir == "fwd":
            hook = _checked(hook, self)
        return super().add_hook(hook, dir, is_permanent, level, prepend, alias_names)


def _checked(fn, point: CheckedHookPoint):
    @functools.wraps(fn)
    def hook(tensor, hook):
        out = fn(tensor, hook=hook)
        if out is None or out is tensor:
            return out
        what = getattr(fn, "__name__", repr(fn))
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"The hook {what} on {point.name} returned a {type(out).__name__}; a hook returns None (to "
                f"leave the activation) or a tensor of shape {tuple(tensor.shape)}, {tensor.dtype}."
            )
        if out.shape != tensor.shape or out.dtype != tensor.dtype or out.device != tensor.device:
            raise ValueError(
                f"The hook {what} on {point.name} returned a tensor of shape {tuple(out.shape)}, {out.dtype} "
                f"on {out.device}; expected shape {tuple(tensor.shape)}, {tensor.dtype} on {tensor.device} "
                "(the activation it was given). Return the same layout (e.g. edit in place or use "
                ".to(activation.dtype)); a transposed or re-typed tensor would flow on as wrong numbers."
            )
        if point.check_finite and not bool(torch.isfinite(out).all()):
            raise FloatingPointError(
                f"The hook {what} on {point.name} introduced NaN or inf values "
                "(checked because model.set_check_finite(True) is on)."
            )
        return out

    return hook


class HookedRMSNorm(nn.Module):
    """Apertus's RMSNorm, exposing the scale and the normalised input (before the weight, TL's convention).

    `norm(x)` is exactly what the model computes; `w` is the weight (TransformerLens's name).
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        hold(self, "norm", norm)
        self.hook_scale = CheckedHookPoint()  # [batch, pos, 1]
        self.hook_normalized = CheckedHookPoint()  # [batch, pos, d_model]

    @property
    def w(self) -> torch.Tensor:
        return self.norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        scale = self.hook_scale(torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + self.norm.variance_epsilon))
        return self.norm.weight * self.hook_normalized((x32 / scale).to(dtype))


class AttentionMask:
    """The attention masks of one forward, built once and only in the forms some layer asks for.

    Queries are the last `n_query` of `n_key` positions (all of them, unless earlier keys come from a KV
    cache); `key_mask` [batch, n_key] marks real tokens (None when nothing is padded).
    """

    def __init__(self, key_mask: torch.Tensor | None, n_query: int, n_key: int, device: torch.device) -> None:
        self.key_mask, self.n_query, self.n_key, self.device = key_mask, n_query, n_key, device

    @property
    def offset(self) -> int:
        return self.n_key - self.n_query

    @property
    def explicit(self) -> bool:
        """Whether SDPA needs an explicit mask (is_causal aligns to the top-left, not to the last key)."""
        return self.key_mask is not None or (self.offset > 0 and self.n_query > 1)

    @cached_property
    def allowed(self) -> torch.Tensor:
        causal = torch.ones(self.n_query, self.n_key, dtype=torch.bool, device=self.device)
        causal = causal.tril(diagonal=self.offset)[None, None]
        return causal if self.key_mask is None else causal & self.key_mask[:, None, None, :]

    @cached_property
    def boolean(self) -> torch.Tensor:
        # Padding queries see nothing and would turn SDPA's output into NaN: let them see themselves.
        keys = torch.arange(self.n_key, device=self.device)[None]
        itself = keys == torch.arange(self.n_query, device=self.device)[:, None] + self.offset
        return self.allowed | itself[None, None]

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """transformers' eager mask: 0 where allowed, the dtype's minimum elsewhere."""
        key = ("additive", dtype)
        if key not in self.__dict__:
            zero = torch.zeros((), dtype=dtype, device=self.device)
            self.__dict__[key] = torch.where(self.allowed, zero, torch.finfo(dtype).min)
        return self.__dict__[key]

    def repeat(self, times: int) -> AttentionMask:
        """The mask of a batch stacked `times` over (patching runs variants as extra rows)."""
        km = None if self.key_mask is None else self.key_mask.repeat(times, 1)
        return AttentionMask(km, self.n_query, self.n_key, self.device)

    def to(self, device: torch.device) -> AttentionMask:
        km = None if self.key_mask is None else self.key_mask.to(device)
        return AttentionMask(km, self.n_query, self.n_key, device)


class HookedAttention(nn.Module):
    """Grouped-query attention with QK-norm and RoPE. Fused SDPA unless this layer's pattern is watched."""

    def __init__(self, attn: nn.Module, layer: int) -> None:
        super().__init__()
        hold(self, "attn", attn)
        self.layer = layer
        self.n_heads = attn.config.num_attention_heads
        self.n_kv_heads = attn.config.num_key_value_heads
        self.d_head = attn.head_dim
        self.hook_q = CheckedHookPoint()  # [batch, pos, head, d_head]
        self.hook_k = CheckedHookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = CheckedHookPoint()  # [batch, pos, kv_head, d_head]
        # After QK-norm, in the [batch, head, pos, d_head] layout in which TransformerBridge reports them.
        self.hook_q_normed = CheckedHookPoint()
        self.hook_k_normed = CheckedHookPoint()
        self.hook_rot_q = CheckedHookPoint()  # [batch, pos, head, d_head]
        self.hook_rot_k = CheckedHookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_attn_scores = CheckedHookPoint()  # [batch, head, query, key], masked entries at dtype min
        self.hook_pattern = CheckedHookPoint()  # [batch, head, query, key]
        self.hook_z = CheckedHookPoint()  # [batch, pos, head, d_head]
        self.hook_result = CheckedHookPoint()  # [batch, pos, head, d_model], only with cfg.use_attn_result

    # Weight views in TransformerLens's layouts (no copies). Keys and values have one entry per KV head.
    def _heads(self, linear: nn.Linear, n: int) -> torch.Tensor:
        return linear.weight.view(n, self.d_head, -1).transpose(1, 2)

    @property
    def W_Q(self) -> torch.Tensor:  # [head, d_model, d_head]
        return self._heads(self.attn.q_proj, self.n_heads)

    @property
    def W_K(self) -> torch.Tensor:  # [kv_head, d_model, d_head]
        return self._heads(self.attn.k_proj, self.n_kv_heads)

    @property
    def W_V(self) -> torch.Tensor:  # [kv_head, d_model, d_head]
        return self._heads(self.attn.v_proj, self.n_kv_heads)

    @property
    def W_O(self) -> torch.Tensor:  # [head, d_head, d_model]
        w = self.attn.o_proj.weight
        return w.view(w.shape[0], self.n_heads, self.d_head).permute(1, 2, 0)

    def _bias(self, linear: nn.Linear, n: int) -> torch.Tensor:
        w = linear.weight
        if linear.bias is not None:
            return linear.bias.view(n, self.d_head)
        return torch.zeros(n, self.d_head, dtype=w.dtype, device=w.device)

    @property
    def b_Q(self) -> torch.Tensor:
        return self._bias(self.attn.q_proj, self.n_heads)

    @property
    def b_K(self) -> torch.Tensor:
        return self._bias(self.attn.k_proj, self.n_kv_heads)

    @property
    def b_V(self) -> torch.Tensor:
        return self._bias(self.attn.v_proj, self.n_kv_heads)

    @property
    def b_O(self) -> torch.Tensor:
        o = self.attn.o_proj
        return o.bias if o.bias is not None else o.weight.new_zeros(o.out_features)

    def kv_head(self, head: int) -> int:
        """The KV head that query head `head` reads (grouped-query attention)."""
        return head // (self.n_heads // self.n_kv_heads)

    def needs_pattern(self) -> bool:
        points = (self.hook_attn_scores, self.hook_pattern)
        return any(p.fwd_hooks or p.bwd_hooks for p in points)

    def forward(self, x, cos, sin, mask: AttentionMask, use_result: bool, kv_cache=None) -> torch.Tensor:
        attn, batch, pos = self.attn, x.shape[0], x.shape[1]
        q = self.hook_q(attn.q_proj(x).view(batch, pos, -1, self.d_head))
        k = self.hook_k(attn.k_proj(x).view(batch, pos, -1, self.d_head))
        v = self.hook_v(attn.v_proj(x).view(batch, pos, -1, self.d_head))
        q = self.hook_q_normed(attn.q_norm(q.transpose(1, 2)))
        k = self.hook_k_normed(attn.k_norm(k.transpose(1, 2)))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q = self.hook_rot_q(q.transpose(1, 2)).transpose(1, 2)
        k = self.hook_rot_k(k.transpose(1, 2)).transpose(1, 2)
        v = v.transpose(1, 2)
        if kv_cache is not None:  # earlier positions' keys and values (generation, mid-sequence starts)
            k, v = kv_cache.update(k, v, self.layer)
        z = self.hook_z(self._mix(q, k, v, mask).transpose(1, 2))
        if not use_result:
            return attn.o_proj(z.reshape(batch, pos, -1))
        result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
        out = result.sum(2)
        return out if attn.o_proj.bias is None else out + attn.o_proj.bias

    def _mix(self, q, k, v, mask: AttentionMask) -> torch.Tensor:
        groups, scaling = self.attn.num_key_value_groups, self.attn.scaling
        if self.needs_pattern():
            scores = masked_scores(q, repeat_kv(k, groups), scaling, mask.additive(q.dtype))
            scores = self.hook_attn_scores(scores)
            pattern = self.hook_pattern(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
            return torch.matmul(pattern, repeat_kv(v, groups))
        if mask.explicit:
            # A boolean mask stops SDPA from taking its GQA path, so share the KV heads by hand (as HF does).
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.boolean, scale=scaling)
        causal = mask.n_query > 1  # one query over all earlier keys (a cached step) needs no mask
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scaling, enable_gqa=groups > 1)


class HookedMLP(nn.Module):
    """The non-gated Apertus MLP: up_proj -> xIELU -> down_proj. `W_in` [d_model, d_mlp], `W_out` [d_mlp,
    d_model] are views of the checkpoint's weights."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        hold(self, "mlp", mlp)
        self.hook_pre = CheckedHookPoint()  # [batch, pos, d_mlp], the xIELU input
        self.hook_post = CheckedHookPoint()  # [batch, pos, d_mlp], the xIELU output

    @property
    def act_fn(self) -> nn.Module:
        return self.mlp.act_fn

    @property
    def W_in(self) -> torch.Tensor:
        return self.mlp.up_proj.weight.T

    @property
    def W_out(self) -> torch.Tensor:
        return self.mlp.down_proj.weight.T

    @property
    def b_in(self) -> torch.Tensor:
        up = self.mlp.up_proj
        return up.bias if up.bias is not None else up.weight.new_zeros(up.out_features)

    @property
    def b_out(self) -> torch.Tensor:
        down = self.mlp.down_proj
        return down.bias if down.bias is not None else down.weight.new_zeros(down.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        return mlp.down_proj(self.hook_post(run_xielu(mlp.act_fn, self.hook_pre(mlp.up_proj(x)))))


def masked_scores(q: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor) -> torch.Tensor:
    """`q @ k^T * scaling + mask` as one baddbmm, [batch, head, query, key].

    The GEMM applies the scale and adds the mask as it writes, sparing two passes over (and one copy of) the
    largest tensor of an explicit attention. Equal to transformers' eager scores to float rounding.
    """
    batch, heads, n_query, d_head = q.shape
    n_key = k.shape[2]
    mask = mask.expand(batch, heads, n_query, n_key).reshape(batch * heads, n_query, n_key)
    q3 = q.reshape(batch * heads, n_query, d_head)
    k3 = k.transpose(2, 3).reshape(batch * heads, d_head, n_key)
    return torch.baddbmm(mask, q3, k3, alpha=scaling).view(batch, heads, n_query, n_key)


def run_xielu(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' `XIELUActivation(x)`, bit for bit, with its Python path done in place when no gradient
    is wanted.

    On the CPU that path is a fifth of the forward pass, mostly spent allocating and filling eleven
    temporaries the size of the MLP; the same operations in the same order, in place, need four. The module
    itself runs when a gradient is needed, when its fused CUDA kernel applies, or when types would promote.
    """
    if (
        not isinstance(act, XIELUActivation)
        or (act._xielu_cuda_obj is not None and x.is_cuda)
        or (torch.is_grad_enabled() and (x.requires_grad or act.alpha_p.requires_grad))
        or torch.promote_types(x.dtype, act.alpha_p.dtype) != x.dtype
    ):
        return act(x)
    alpha_p = F.softplus(act.alpha_p)
    alpha_n = act.beta + F.softplus(act.alpha_n)
    beta_x = act.beta * x
    positive = (alpha_p * x).mul_(x).add_(beta_x)
    negative = torch.min(x, act.eps).expm1_().sub_(x).mul_(alpha_n).add_(beta_x)
    return torch.where(x > 0, positive, negative)


class HookedBlock(nn.Module):
    """One pre-norm decoder layer: resid + attn(ln1(resid)), then + mlp(ln2(resid))."""

    # TransformerLens's logit lens asks whether a block's output is the single stream the model unembeds.
    hook_out_is_single_residual_stream = True

    def __init__(self, layer: nn.Module, index: int) -> None:
        super().__init__()
        self.ln1 = HookedRMSNorm(layer.attention_layernorm)
        self.attn = HookedAttention(layer.self_attn, index)
        self.ln2 = HookedRMSNorm(layer.feedforward_layernorm)
        self.mlp = HookedMLP(layer.mlp)
        self.hook_resid_pre = CheckedHookPoint()
        self.hook_attn_out = CheckedHookPoint()
        self.hook_resid_mid = CheckedHookPoint()
        self.hook_mlp_out = CheckedHookPoint()
        self.hook_resid_post = CheckedHookPoint()

    def forward(self, resid, cos, sin, mask: AttentionMask, use_result: bool, kv_cache=None) -> torch.Tensor:
        resid = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid), cos, sin, mask, use_result, kv_cache))
        resid = self.hook_resid_mid(resid + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid)))
        return self.hook_resid_post(resid + mlp_out)
