"""The hooked model: Hugging Face's Apertus, run by one readable forward with a hook at every activation.

`HookedApertus` wraps an `ApertusForCausalLM` (or `ApertusForTokenClassification`) loaded by transformers.
Its hooked parts (`workbench.hooked_parts`) hold the transformers modules they run, so the weights are the
checkpoint's (no copies, no conversion, any dtype or `device_map`) and read in TransformerLens's layouts
(`W_Q`, `W_O`, `W_in`, `W_out`, ...). Hook names and shapes follow TransformerLens's `TransformerBridge` for
Apertus. A `HookPoint` is an identity module: with nobody listening it costs one function call.

The forward, in one place: embed -> for each layer (ln1 -> attention -> add, ln2 -> xIELU MLP -> add) ->
final norm -> unembed. It can start at any layer from a given residual stream (`start_at_layer`), stop at
any layer (`stop_at_layer`), and continue from earlier positions' keys and values (`past_key_values`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import ActivationCache
from transformer_lens.HookedRootModule import HookedRootModule

from workbench import generation, inputs
from workbench.extra_hook_points import ExtraHookPoints
from workbench.hooked_parts import AttentionMask, CheckedHookPoint, HookedBlock, HookedRMSNorm
from workbench.inputs import Input
from workbench.model_surface import ModelSurface

NamesFilter = None | str | Sequence[str] | Callable[[str], bool]
RETURN_TYPES = ("logits", "loss", "both", None)


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
        head = output_head(hf_model)
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


def output_head(hf_model: nn.Module) -> nn.Linear:
    """The output head: ApertusForCausalLM unembeds with lm_head; ApertusForTokenClassification scores with
    `score`."""
    return hf_model.lm_head if hasattr(hf_model, "lm_head") else hf_model.score


class HookedApertus(ModelSurface, ExtraHookPoints, HookedRootModule):
    """An Apertus model with TransformerLens hooks on every residual stream, attention and xIELU activation.

    Build it with `workbench.load(...)`. `model(input)` returns logits; `run_with_cache`, `run_with_hooks`,
    `hooks(...)` and `hook_dict` work as in TransformerLens. `input` is a text, a list of texts (padded,
    with the mask made for you) or a tensor of token ids. Tokens, weights and checks: `ModelSurface`;
    hook points added for a while (a spliced SAE's): `ExtraHookPoints`.
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any, name: str = "apertus") -> None:
        super().__init__()
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.cfg = ApertusLensConfig.from_hf(hf_model, name)
        body = hf_model.model
        self.hook_embed = CheckedHookPoint()
        self.blocks = nn.ModuleList(HookedBlock(layer, i) for i, layer in enumerate(body.layers))
        self.ln_final = HookedRMSNorm(body.norm)
        self.setup()
        self.eval()  # as the wrapped model; TransformerLens's logit lens refuses a model in training mode

    def setup(self) -> None:
        # Only our own modules are named and hookable; the wrapped transformers modules keep to themselves.
        self.mod_dict, self.hook_dict = {}, {}
        for name, module in self.named_modules():
            if name == "" or name == "hf_model" or name.startswith("hf_model."):
                continue
            module.name = name
            self.mod_dict[name] = module
            if isinstance(module, CheckedHookPoint):
                self.hook_dict[name] = module
        for name, point in self.__dict__.get("_added_points", {}).items():  # a setup() rerun keeps them
            self.hook_dict[name] = self.mod_dict[name] = point

    # ---------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input: Input,
        attention_mask: torch.Tensor | None = None,
        *,
        return_type: Literal["logits", "loss", "both"] | None = "logits",
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        tokens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
    ) -> Any:
        """Run the model and return logits (or the loss, or both, or None: `return_type`).

        start_at_layer=l: `input` is the residual stream [batch, pos, d_model] entering layer l (pass the
        attention_mask of its tokens, and `tokens` for a loss). stop_at_layer=l: return the residual
        stream entering layer l instead of logits (negative l counts from the end, as in TransformerLens).
        past_key_values: a transformers `DynamicCache` holding earlier positions' keys and values; `input`
        holds the new positions only and attention_mask covers earlier and new positions.
        """
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {RETURN_TYPES}, not {return_type!r}.")
        first = 0 if start_at_layer is None else self.check_layer(start_at_layer, what="start_at_layer")
        last = self.cfg.n_layers if stop_at_layer is None else self._stop_layer(stop_at_layer, first)
        if start_at_layer is None:
            tokens, key_mask = self.prepare_input(input, attention_mask, past_key_values)
            resid = self.hook_embed(self.hf_model.model.embed_tokens(tokens))
        else:
            resid, key_mask = self._prepare_resid(input, attention_mask, past_key_values)
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        mask = AttentionMask(key_mask, resid.shape[1], past + resid.shape[1], resid.device)
        position_ids = self.positions(mask, position_ids)
        cos, sin = self.hf_model.model.rotary_emb(resid, position_ids=position_ids)
        for index in range(first, last):
            device = self.layer_device(index)
            if resid.device != device:  # a model split over several devices by device_map
                resid, cos, sin, mask = resid.to(device), cos.to(device), sin.to(device), mask.to(device)
            resid = self.blocks[index](resid, cos, sin, mask, self.cfg.use_attn_result, past_key_values)
        if stop_at_layer is not None:
            return resid
        resid = self.ln_final(resid.to(self.ln_final.w.device))
        if return_type is None:
            return None
        logits = self.unembed(resid)
        if return_type == "logits":
            return logits
        if tokens is None:
            raise ValueError("A loss needs the tokens: pass tokens= when you start from a residual stream.")
        loss = next_token_loss(logits, tokens, key_mask)
        return loss if return_type == "loss" else (logits, loss)

    def _stop_layer(self, stop_at_layer: int, first: int) -> int:
        n = self.cfg.n_layers
        last = stop_at_layer + n if isinstance(stop_at_layer, int) and stop_at_layer < 0 else stop_at_layer
        self.check_layer(last, allow_end=True, what="stop_at_layer")
        if last < first:
            raise ValueError(f"stop_at_layer {stop_at_layer} comes before start_at_layer {first}.")
        return last

    def positions(self, mask: AttentionMask, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rotary positions of the queries: left padding does not shift real tokens (as transformers'
        generate does: cumsum(mask) - 1), and cached keys come first."""
        if position_ids is not None:
            return position_ids.to(mask.device)
        if mask.key_mask is None:
            return torch.arange(mask.offset, mask.n_key, device=mask.device)[None]
        return (mask.key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, mask.offset :]

    def prepare_input(self, input: Input, attention_mask=None, past_key_values=None):
        """Tokens on the embedding's device and a boolean key mask (None when nothing is padded)."""
        if isinstance(input, (str, list, tuple)):
            if attention_mask is not None:
                raise ValueError(
                    "attention_mask was passed with text: the workbench pads texts and makes their mask "
                    "itself. Pass token ids (model.tokenize(texts)) to use your own mask."
                )
            tokens, attention_mask = self.tokenize(input)
        else:
            tokens = inputs.as_token_tensor(input)
            self.check_tokens(tokens)
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        key_mask = inputs.check_attention_mask(attention_mask, (tokens.shape[0], past + tokens.shape[1]))
        device = self.W_E.device
        return tokens.to(device), None if key_mask is None else key_mask.to(device)

    def _prepare_resid(self, resid, attention_mask, past_key_values):
        if not isinstance(resid, torch.Tensor) or resid.ndim != 3 or resid.shape[-1] != self.cfg.d_model:
            shape = tuple(resid.shape) if isinstance(resid, torch.Tensor) else type(resid).__name__
            raise ValueError(
                f"With start_at_layer the input is a residual stream [batch, pos, {self.cfg.d_model}]; "
                f"got {shape}."
            )
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        key_mask = inputs.check_attention_mask(attention_mask, (resid.shape[0], past + resid.shape[1]))
        return resid, None if key_mask is None else key_mask.to(resid.device)

    # ------------------------------------------------------------------------------------------ hooks
    def set_check_finite(self, check: bool = True) -> None:
        """Make every hook that returns NaN or inf raise (off by default: a pass over each result)."""
        for point in self.hook_dict.values():
            point.check_finite = check

    def _names_filter(self, names_filter: NamesFilter) -> Callable[[str], bool]:
        if names_filter is None:
            wanted: Callable[[str], bool] = lambda name: True  # noqa: E731
        elif isinstance(names_filter, str):
            wanted = {self.check_hook_name(names_filter)}.__contains__
        elif callable(names_filter):
            wanted = names_filter
            if not any(wanted(name) for name in self.hook_dict):
                warnings.warn(
                    "names_filter matches no hook point of this model, so the cache will be empty: "
                    "see model.hook_dict for the names.",
                    stacklevel=3,
                )
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

    def generate(self, input: Input, max_new_tokens: int = 20, **kwargs) -> Any:
        """Generate with a KV cache, every hook firing at every step: `workbench.generation.generate`."""
        return generation.generate(self, input, max_new_tokens, **kwargs)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)  # .to()/.cuda() move hf_model's parameters in place
        param = next(self.hf_model.parameters())
        self.cfg.device, self.cfg.dtype = param.device, param.dtype
        return result

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"HookedApertus({c.model_name!r}: {c.n_layers} layers, d_model={c.d_model}, {c.n_heads} heads / "
            f"{c.n_key_value_heads} KV heads of {c.d_head}, d_mlp={c.d_mlp}, vocab={c.d_vocab}, "
            f"{c.dtype}, {c.device}, {len(self.hook_dict)} hook points)"
        )


def next_token_loss(
    logits: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean cross-entropy of each real token given the ones before it (padding excluded)."""
    targets = tokens[:, 1:].clone()
    if key_mask is not None:
        targets[~key_mask[:, key_mask.shape[1] - tokens.shape[1] + 1 :]] = -100
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten().to(logits.device))
