"""The hooked model: Hugging Face's Apertus, run by one readable forward with a hook at every activation.

`HookedApertus` wraps an `ApertusForCausalLM` (or `ApertusForTokenClassification`) loaded by transformers and
calls its own modules, so the weights are the checkpoint's (no copies, no conversion, any dtype or
`device_map`). Hook names and shapes follow TransformerLens's `TransformerBridge` for Apertus, so code and
habits carry over. A `HookPoint` is an identity module: with nobody listening it costs one function call.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import ActivationCache
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule
from transformers.activations import XIELUActivation
from transformers.models.apertus.modeling_apertus import apply_rotary_pos_emb, repeat_kv

Input = str | Sequence[str] | torch.Tensor
NamesFilter = None | str | Sequence[str] | Callable[[str], bool]


@dataclass
class ApertusLensConfig:
    """The model's shape under TransformerLens's field names (what `ActivationCache` and TL habits expect)."""

    model_name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    d_vocab_out: int
    n_ctx: int
    eps: float
    original_architecture: str
    normalization_type: str = "RMS"
    positional_embedding_type: str = "rotary"
    act_fn: str = "xielu"
    attn_only: bool = False
    use_attn_result: bool = False
    device: torch.device | None = None
    dtype: torch.dtype | None = None

    @classmethod
    def from_hf(cls, hf_model: nn.Module, name: str) -> ApertusLensConfig:
        c = hf_model.config
        head = _output_head(hf_model)
        return cls(
            model_name=name,
            n_layers=c.num_hidden_layers,
            d_model=c.hidden_size,
            n_heads=c.num_attention_heads,
            n_key_value_heads=c.num_key_value_heads,
            d_head=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            d_mlp=c.intermediate_size,
            d_vocab=c.vocab_size,
            d_vocab_out=head.out_features,
            n_ctx=c.max_position_embeddings,
            eps=c.rms_norm_eps,
            original_architecture=type(hf_model).__name__,
            device=next(hf_model.parameters()).device,
            dtype=next(hf_model.parameters()).dtype,
        )


def _output_head(hf_model: nn.Module) -> nn.Linear:
    # ApertusForCausalLM unembeds with lm_head; ApertusForTokenClassification scores with `score`.
    return hf_model.lm_head if hasattr(hf_model, "lm_head") else hf_model.score


class HookedRMSNorm(nn.Module):
    """RMSNorm as Apertus computes it, exposing the scale and the normalised input (before the weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        scale = self.hook_scale(torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
        return norm.weight * self.hook_normalized((x32 / scale).to(dtype))


class HookedAttention(nn.Module):
    """Grouped-query attention with QK-norm and RoPE. Fused SDPA unless this layer's pattern is watched."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]
        # After QK-norm, in the [batch, head, pos, d_head] layout in which TransformerBridge reports them.
        self.hook_q_normed = HookPoint()
        self.hook_k_normed = HookPoint()
        self.hook_rot_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_rot_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query, key], masked entries at dtype min
        self.hook_pattern = HookPoint()  # [batch, head, query, key]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model], only with cfg.use_attn_result

    def needs_pattern(self) -> bool:
        return bool(
            self.hook_attn_scores.fwd_hooks
            or self.hook_pattern.fwd_hooks
            or self.hook_attn_scores.bwd_hooks
            or self.hook_pattern.bwd_hooks
        )

    def forward(self, x, attn: nn.Module, cos, sin, masks: _Masks, use_result: bool) -> torch.Tensor:
        batch, pos, _ = x.shape
        d_head = attn.head_dim
        q = self.hook_q(attn.q_proj(x).view(batch, pos, -1, d_head))
        k = self.hook_k(attn.k_proj(x).view(batch, pos, -1, d_head))
        v = self.hook_v(attn.v_proj(x).view(batch, pos, -1, d_head))
        q = self.hook_q_normed(attn.q_norm(q.transpose(1, 2)))
        k = self.hook_k_normed(attn.k_norm(k.transpose(1, 2)))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q = self.hook_rot_q(q.transpose(1, 2)).transpose(1, 2)
        k = self.hook_rot_k(k.transpose(1, 2)).transpose(1, 2)
        v = v.transpose(1, 2)

        if self.needs_pattern():
            groups = attn.num_key_value_groups
            scores = masked_scores(q, repeat_kv(k, groups), attn.scaling, masks.additive(q.dtype))
            scores = self.hook_attn_scores(scores)
            pattern = self.hook_pattern(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
            z = torch.matmul(pattern, repeat_kv(v, groups))
        elif masks.padded:
            # A boolean mask stops SDPA from taking its GQA path, so share the KV heads by hand (as HF does).
            groups = attn.num_key_value_groups
            z = F.scaled_dot_product_attention(
                q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=masks.boolean, scale=attn.scaling
            )
        else:
            z = F.scaled_dot_product_attention(
                q, k, v, is_causal=pos > 1, scale=attn.scaling, enable_gqa=attn.num_key_value_groups > 1
            )
        z = self.hook_z(z.transpose(1, 2))

        if not use_result:
            return attn.o_proj(z.reshape(batch, pos, -1))
        w_o = attn.o_proj.weight.view(attn.o_proj.out_features, -1, d_head)
        result = self.hook_result(torch.einsum("bphd,mhd->bphm", z, w_o))
        out = result.sum(2)
        return out if attn.o_proj.bias is None else out + attn.o_proj.bias


class HookedMLP(nn.Module):
    """The non-gated Apertus MLP: up_proj -> xIELU -> down_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp], the xIELU input
        self.hook_post = HookPoint()  # [batch, pos, d_mlp], the xIELU output

    def forward(self, x: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
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

    def __init__(self) -> None:
        super().__init__()
        self.ln1 = HookedRMSNorm()
        self.attn = HookedAttention()
        self.ln2 = HookedRMSNorm()
        self.mlp = HookedMLP()
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid, layer: nn.Module, cos, sin, masks: _Masks, use_result: bool) -> torch.Tensor:
        resid = self.hook_resid_pre(resid)
        normed = self.ln1(resid, layer.attention_layernorm)
        attn_out = self.hook_attn_out(self.attn(normed, layer.self_attn, cos, sin, masks, use_result))
        resid = self.hook_resid_mid(resid + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid, layer.feedforward_layernorm), layer.mlp))
        return self.hook_resid_post(resid + mlp_out)


class _Masks:
    """The attention masks of one forward, built once and only in the forms some layer asks for."""

    def __init__(self, key_mask: torch.Tensor | None, length: int, device: torch.device) -> None:
        self.key_mask = key_mask  # [batch, key] bool, None when nothing is padded
        self.length = length
        self.device = device

    @property
    def padded(self) -> bool:
        return self.key_mask is not None

    @cached_property
    def allowed(self) -> torch.Tensor:
        causal = torch.ones(self.length, self.length, dtype=torch.bool, device=self.device).tril()
        if self.key_mask is None:
            return causal[None, None]
        return causal[None, None] & self.key_mask[:, None, None, :]

    @cached_property
    def boolean(self) -> torch.Tensor:
        # Padding queries see nothing and would turn SDPA's output into NaN: let them see themselves.
        eye = torch.eye(self.length, dtype=torch.bool, device=self.device)[None, None]
        return self.allowed | eye

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        # The same additive mask as transformers' eager attention: 0 where allowed, dtype min elsewhere.
        key = ("additive", dtype)
        if key not in self.__dict__:
            zero = torch.zeros((), dtype=dtype, device=self.device)
            self.__dict__[key] = torch.where(self.allowed, zero, torch.finfo(dtype).min)
        return self.__dict__[key]

    def to(self, device: torch.device) -> _Masks:
        km = None if self.key_mask is None else self.key_mask.to(device)
        return _Masks(km, self.length, device)


class HookedApertus(HookedRootModule):
    """An Apertus model with TransformerLens hooks on every residual stream, attention and xIELU activation.

    Build it with `workbench.load(...)`. `model(input)` returns logits; `run_with_cache`, `run_with_hooks`,
    `hooks(...)` and `hook_dict` work as in TransformerLens. `input` is a text, a list of texts (padded,
    with the mask made for you) or a tensor of token ids.
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any, name: str = "apertus") -> None:
        super().__init__()
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.cfg = ApertusLensConfig.from_hf(hf_model, name)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(HookedBlock() for _ in range(self.cfg.n_layers))
        self.ln_final = HookedRMSNorm()
        self.setup()

    def setup(self) -> None:
        # Only our own modules are named and hookable; the wrapped transformers modules keep to themselves.
        self.mod_dict, self.hook_dict = {}, {}
        for name, module in self.named_modules():
            if name == "" or name == "hf_model" or name.startswith("hf_model."):
                continue
            module.name = name
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                self.hook_dict[name] = module

    # ---------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input: Input,
        attention_mask: torch.Tensor | None = None,
        *,
        return_type: Literal["logits", "loss", "both"] | None = "logits",
        stop_at_layer: int | None = None,
    ) -> Any:
        """Run the model. `stop_at_layer=l` returns the residual stream entering layer l (no logits)."""
        tokens, key_mask = self._prepare(input, attention_mask)
        if stop_at_layer is not None:
            self.check_layer(stop_at_layer, allow_end=True, what="stop_at_layer")
        body = self.hf_model.model
        if key_mask is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device)[None]
        else:
            # Left padding must not shift the real tokens' positions (as transformers' generate does).
            position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)

        resid = self.hook_embed(body.embed_tokens(tokens))
        cos, sin = body.rotary_emb(resid, position_ids=position_ids)
        masks = _Masks(key_mask, tokens.shape[1], resid.device)
        last = self.cfg.n_layers if stop_at_layer is None else stop_at_layer
        for block, layer, device in zip(self.blocks[:last], body.layers[:last], self._layer_devices):
            if resid.device != device:  # a model split over several devices by device_map
                resid, cos, sin, masks = resid.to(device), cos.to(device), sin.to(device), masks.to(device)
            resid = block(resid, layer, cos, sin, masks, self.cfg.use_attn_result)
        if stop_at_layer is not None:
            return resid

        head = _output_head(self.hf_model)
        resid = self.ln_final(resid.to(body.norm.weight.device), body.norm)
        if return_type is None:
            return None
        logits = head(resid.to(head.weight.device))
        if return_type == "logits":
            return logits
        loss = self._next_token_loss(logits, tokens, key_mask)
        return loss if return_type == "loss" else (logits, loss)

    def _next_token_loss(self, logits, tokens, key_mask) -> torch.Tensor:
        targets = tokens[:, 1:].clone()
        if key_mask is not None:
            targets[~key_mask[:, 1:]] = -100
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten().to(logits.device))

    @cached_property
    def _layer_devices(self) -> list[torch.device]:
        devices = []
        for layer in self.hf_model.model.layers:
            device = layer.attention_layernorm.weight.device
            if device.type == "meta":
                raise ValueError(
                    "Some weights are offloaded (on the 'meta' device), which HookedApertus cannot run: "
                    "load with enough GPU/CPU memory for the whole model (e.g. dtype=torch.bfloat16, or "
                    "device_map='auto' without disk offload)."
                )
            devices.append(device)
        return devices

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_layer_devices", None)  # .to()/.cuda() move the layers
        result = super()._apply(fn, recurse)
        param = next(self.hf_model.parameters())
        self.cfg.device, self.cfg.dtype = param.device, param.dtype
        return result

    # ------------------------------------------------------------------------------------------ input
    def _prepare(self, input: Input, attention_mask: torch.Tensor | None):
        """Tokens on the embedding's device and a boolean key mask (None when nothing is padded)."""
        if isinstance(input, torch.Tensor):
            tokens = input[None] if input.ndim == 1 else input
            if tokens.ndim != 2:
                raise ValueError(f"Token ids must be [batch, pos] or [pos]; got shape {tuple(input.shape)}.")
            if tokens.dtype.is_floating_point:
                raise TypeError(f"Token ids must be integers; got dtype {tokens.dtype}.")
            self._check_tokens(tokens)
        else:
            tokens, attention_mask = self._tokenize(input)
        device = self.hf_model.model.embed_tokens.weight.device
        tokens = tokens.to(device)
        if attention_mask is None or bool(attention_mask.all()):
            return tokens, None
        if attention_mask.shape != tokens.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the tokens have shape "
                f"{tuple(tokens.shape)}; pass one 0/1 entry per token."
            )
        return tokens, attention_mask.to(device).bool()

    def _tokenize(
        self, input: str | Sequence[str], prepend_bos: bool = True, padding_side: str | None = None
    ):
        texts = [input] if isinstance(input, str) else list(input)
        if not texts:
            raise ValueError(
                "No prompt given: pass a text, a non-empty list of texts, or a tensor of token ids."
            )
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"Prompt {i} is a {type(text).__name__}, not a str.")
            if not text:
                raise ValueError(f"Prompt {i} is empty: give it at least one character.")
        encoded = [self.tokenizer(text, add_special_tokens=prepend_bos)["input_ids"] for text in texts]
        bos = self.tokenizer.bos_token_id
        if prepend_bos and bos is not None:
            encoded = [ids if ids[:1] == [bos] else [bos, *ids] for ids in encoded]
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        width = max(len(ids) for ids in encoded)
        left = (padding_side or self.tokenizer.padding_side) == "left"
        tokens = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            span = slice(width - len(ids), width) if left else slice(0, len(ids))
            tokens[row, span] = torch.tensor(ids, dtype=torch.long)
            mask[row, span] = 1
        self._check_tokens(tokens)
        return tokens, mask

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.numel() == 0:
            raise ValueError(
                f"Empty prompt (token tensor of shape {tuple(tokens.shape)}): give at least one token."
            )
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(
                f"The prompt has {tokens.shape[1]} tokens but the model's context is {self.cfg.n_ctx} "
                "(max_position_embeddings): shorten it or split it into windows."
            )
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.cfg.d_vocab:
            bad = low if low < 0 else high
            raise ValueError(
                f"Token id {bad} is outside the vocabulary (0..{self.cfg.d_vocab - 1}): were these ids made "
                "by another model's tokenizer? Use model.to_tokens(text)."
            )

    # --------------------------------------------------------------------------------------- tokenizer
    def to_tokens(
        self, input: str | Sequence[str], prepend_bos: bool = True, padding_side: str | None = None
    ) -> torch.Tensor:
        """Token ids [batch, pos]: BOS first (as Apertus is trained); a list of texts is padded."""
        tokens, _ = self._tokenize(input, prepend_bos, padding_side)
        return tokens.to(self.cfg.device)

    def to_str_tokens(self, input: str | torch.Tensor | Sequence[int], prepend_bos: bool = True) -> list[str]:
        """Each token as its text, e.g. ['<s>', ' When', ' Mary', ...]."""
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos)[0].tolist()
        elif isinstance(input, torch.Tensor):
            if input.ndim == 2 and input.shape[0] != 1:
                raise ValueError("to_str_tokens takes one prompt; index the batch first (tokens[i]).")
            ids = input.flatten().tolist()
        else:
            ids = list(input)
        return [self._token_text(i) for i in ids]

    def _token_text(self, token_id: int) -> str:
        text = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        # SentencePiece-style decoders drop the word-start marker of a lone token; keep it visible as a space.
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece.startswith("▁") and not text.startswith(" "):
            text = " " + text
        return text

    def to_string(self, tokens: torch.Tensor | Sequence[int]) -> str | list[str]:
        """Decode ids back to text (a list of texts for a [batch, pos] tensor)."""
        if isinstance(tokens, torch.Tensor) and tokens.ndim == 2:
            return [self.to_string(row) for row in tokens]
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    def to_single_token(self, text: str) -> int:
        """The id of a text that must be exactly one token (an answer such as ' Mary')."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [self._token_text(i) for i in ids]
            raise ValueError(f"{text!r} is not a single token: it splits into {len(ids)} tokens {pieces}.")
        return ids[0]

    def tokens_to_residual_directions(self, tokens: int | str | torch.Tensor) -> torch.Tensor:
        """Unembedding directions [..., d_model] of tokens (for logit differences and attribution)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        tokens = torch.as_tensor(tokens, device=self.W_U.device)
        return self.W_U[:, tokens].T if tokens.ndim else self.W_U[:, tokens]

    # ---------------------------------------------------------------------------------------- weights
    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding [d_model, d_vocab] (the output head's weight, transposed view)."""
        return _output_head(self.hf_model).weight.T

    @property
    def W_E(self) -> torch.Tensor:
        """Embedding [d_vocab, d_model]."""
        return self.hf_model.model.embed_tokens.weight

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute each head's output in the residual basis (`attn.hook_result`), as in TransformerLens."""
        self.cfg.use_attn_result = use_attn_result

    def xielu_parameters(self) -> pd.DataFrame:
        """Per layer, the xIELU scalars as the activation applies them.

        alpha_p = softplus(raw alpha_p) scales x^2 for x > 0; alpha_n = beta + softplus(raw alpha_n) scales
        expm1(min(x, eps)) - x for x <= 0; beta is the linear slope; eps clamps the negative branch.
        """
        rows = []
        for layer, decoder in enumerate(self.hf_model.model.layers):
            act = decoder.mlp.act_fn
            beta = act.beta.detach().float()
            rows.append(
                {
                    "layer": layer,
                    "alpha_p": F.softplus(act.alpha_p.detach().float()).item(),
                    "alpha_n": (beta + F.softplus(act.alpha_n.detach().float())).item(),
                    "beta": beta.item(),
                    "eps": act.eps.detach().float().item(),
                }
            )
        return pd.DataFrame(rows).set_index("layer")

    # ------------------------------------------------------------------------------------------ hooks
    def check_layer(self, layer: int, *, allow_end: bool = False, what: str = "layer") -> int:
        top = self.cfg.n_layers + (1 if allow_end else 0)
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < top:
            raise IndexError(
                f"{what} {layer!r} is out of range: the model has {self.cfg.n_layers} layers (0..{top - 1})."
            )
        return layer

    def check_head(self, head: int) -> int:
        if not isinstance(head, int) or isinstance(head, bool) or not 0 <= head < self.cfg.n_heads:
            raise IndexError(
                f"head {head!r} is out of range: each layer has {self.cfg.n_heads} heads "
                f"(0..{self.cfg.n_heads - 1})."
            )
        return head

    def check_hook_name(self, name: str) -> str:
        """Raise a KeyError naming the closest valid hook names when `name` is not a hook of this model."""
        if name in self.hook_dict:
            if name.endswith("attn.hook_result") and not self.cfg.use_attn_result:
                raise ValueError(
                    f"{name} is computed only when per-head results are on: call "
                    "model.set_use_attn_result(True) first (a [batch, pos, head, d_model] tensor a layer)."
                )
            return name
        match = re.match(r"blocks\.(\d+)\.", name)
        if match and int(match.group(1)) >= self.cfg.n_layers:
            raise KeyError(
                f"Hook {name!r}: layer {match.group(1)} is out of range, the model has {self.cfg.n_layers} "
                f"layers (0..{self.cfg.n_layers - 1})."
            )
        close = difflib.get_close_matches(name, self.hook_dict, n=5, cutoff=0.5)
        hint = (
            f" Closest valid names: {', '.join(close)}." if close else " See model.hook_dict for all names."
        )
        raise KeyError(f"{name!r} is not a hook point of this model.{hint}")

    def _names_filter(self, names_filter: NamesFilter) -> Callable[[str], bool]:
        if names_filter is None:
            wanted: Callable[[str], bool] = lambda name: True  # noqa: E731
        elif isinstance(names_filter, str):
            wanted = {self.check_hook_name(names_filter)}.__contains__
        elif callable(names_filter):
            wanted = names_filter
        else:
            wanted = {self.check_hook_name(n) for n in names_filter}.__contains__
        if self.cfg.use_attn_result:
            return wanted
        return lambda name: wanted(name) and not name.endswith("hook_result")

    def remove_all_hook_fns(self, direction="both", including_permanent=False, level=None) -> None:
        # Only the points that hold hooks: TransformerLens reassigns every point's hook lists through
        # nn.Module.__setattr__, a tenth of a small model's patching sweep when done for all ~200 points.
        for point in self.hook_dict.values():
            if point.fwd_hooks or point.bwd_hooks:
                point.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def clear_contexts(self) -> None:
        for point in self.hook_dict.values():
            if point.ctx:
                point.clear_context()

    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, clear_contexts: bool = False):
        # Check every name before attaching anything, so that a typo leaves the model as it was.
        for name, _ in [*fwd_hooks, *bwd_hooks]:
            if isinstance(name, str):
                self.check_hook_name(name)
        return super().hooks(list(fwd_hooks), list(bwd_hooks), reset_hooks_end, clear_contexts)

    def run_with_hooks(
        self,
        input: Input,
        *args,
        fwd_hooks=(),
        bwd_hooks=(),
        reset_hooks_end=True,
        clear_contexts=False,
        **kwargs,
    ):
        """Run with temporary hooks `[(name or filter, fn(activation, hook))]`; a returned tensor replaces
        the activation and flows on."""
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(input, *args, **kwargs)

    def run_with_cache(
        self,
        input: Input,
        *args,
        names_filter: NamesFilter = None,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        return_cache_object: bool = True,
        **kwargs,
    ) -> tuple[Any, ActivationCache | dict]:
        """Run once, keeping the activations `names_filter` chooses (default: all) in an ActivationCache."""
        if remove_batch_dim and isinstance(input, list) and len(input) > 1:
            raise ValueError("remove_batch_dim=True needs a single prompt; this batch has several.")
        out, cache = super().run_with_cache(
            input,
            *args,
            names_filter=self._names_filter(names_filter),
            device=device,
            remove_batch_dim=remove_batch_dim,
            incl_bwd=incl_bwd,
            **kwargs,
        )
        if return_cache_object:
            cache = ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"HookedApertus({c.model_name!r}: {c.n_layers} layers, d_model={c.d_model}, {c.n_heads} heads / "
            f"{c.n_key_value_heads} KV heads of {c.d_head}, d_mlp={c.d_mlp}, vocab={c.d_vocab}, "
            f"{c.dtype}, {c.device}, {len(self.hook_dict)} hook points)"
        )
