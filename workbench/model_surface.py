"""The model's public surface besides its forward: tokens, weights in TransformerLens's names, and checks.

`HookedApertus` inherits these; analyses call them instead of reaching into transformers' modules, so the
output head, the unembedding, the final norm, the padding rule and the range checks each live once.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from workbench import inputs
from workbench.token_text import display_tokens
from workbench.vocabulary import check_known


class ModelSurface:
    """Methods of `HookedApertus` that read its tokenizer, its weights and its shape (`self.cfg`)."""

    # --------------------------------------------------------------------------------------- tokens
    @property
    def pad_token_id(self) -> int:
        return inputs.pad_token_id(self.tokenizer)

    def tokenize(
        self, input: str | Sequence[str], prepend_bos: bool = True, padding_side: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and a 0/1 mask [batch, pos] (on the CPU): BOS first, padded by the one padding rule."""
        tokens, mask = inputs.tokenize(self.tokenizer, input, prepend_bos, padding_side)
        self.check_tokens(tokens)
        return tokens, mask

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Refuse empty inputs, inputs longer than the context and ids outside the vocabulary."""
        inputs.check_tokens(tokens, self.cfg.d_vocab, self.cfg.n_ctx)

    def to_tokens(
        self, input: str | Sequence[str], prepend_bos: bool = True, padding_side: str | None = None
    ) -> torch.Tensor:
        """Token ids [batch, pos]: BOS first (as Apertus is trained); a list of texts is padded."""
        return self.tokenize(input, prepend_bos, padding_side)[0].to(self.cfg.device)

    def token_text(self, token_id: int) -> str:
        """The text of one token as the tokenizer decodes it (a word-start marker kept as a space)."""
        text = self.tokenizer.decode([int(token_id)], clean_up_tokenization_spaces=False)
        # SentencePiece-style decoders drop the word-start marker of a lone token; keep it visible as a space.
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if isinstance(piece, str) and piece.startswith("▁") and not text.startswith(" "):
            text = " " + text
        return text

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
        return [self.token_text(i) for i in ids]

    def token_labels(self, ids: torch.Tensor | Sequence[int]) -> list[str]:
        """Display text of tokens for figures and tables: byte-level pieces decoded, a leading space shown
        as `␣`, partial UTF-8 as `<0xF0>`, control characters escaped (`workbench.token_text`)."""
        ids = ids.flatten().tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return display_tokens(self.tokenizer, ids)

    def vocabulary_labels(self) -> list[str]:
        """`token_labels` of the whole vocabulary, computed once per tokenizer (131k tokens take seconds).
        Shared: do not modify the list."""
        cached = getattr(self, "_vocabulary_labels", None)
        if cached is None or cached[0] is not self.tokenizer:
            cached = (self.tokenizer, self.token_labels(range(self.cfg.d_vocab)))
            self._vocabulary_labels = cached
        return cached[1]

    def to_string(self, tokens: torch.Tensor | Sequence[int]) -> str | list[str]:
        """Decode ids back to text (a list of texts for a [batch, pos] tensor)."""
        if isinstance(tokens, torch.Tensor) and tokens.ndim == 2:
            return [self.to_string(row) for row in tokens]
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    def to_single_token(self, text: str) -> int:
        """The id of a text that must be exactly one known token (an answer such as ' Mary')."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [self.token_text(i) for i in ids]
            raise ValueError(f"{text!r} is not a single token: it splits into {len(ids)} tokens {pieces}.")
        check_known(self, text, ids[0])
        return ids[0]

    # -------------------------------------------------------------------------------------- weights
    @property
    def output_head(self) -> nn.Linear:
        hf = self.hf_model
        return hf.lm_head if hasattr(hf, "lm_head") else hf.score

    def unembed(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits from a residual stream that went through `ln_final` (the model's own output head)."""
        head = self.output_head
        return head(normed.to(head.weight.device))

    def tokens_to_residual_directions(self, tokens: int | str | torch.Tensor) -> torch.Tensor:
        """Directions [..., d_model] that read tokens' logits from a residual stream divided by its final RMS
        scale: W_U columns times the final norm's weight (TransformerLens's folded convention), so that
        `cache.logit_attrs` and `apply_ln_to_stack` give the model's own logits."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        w_u = self.output_head.weight  # [d_vocab, d_model]
        ids = torch.as_tensor(tokens, device=w_u.device)
        return w_u[ids] * self.ln_final.w.to(w_u.device)

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding [d_model, d_vocab] (the output head's weight, a transposed view)."""
        return self.output_head.weight.T

    @property
    def b_U(self) -> torch.Tensor:
        head = self.output_head
        return head.bias if head.bias is not None else head.weight.new_zeros(head.out_features)

    @property
    def W_E(self) -> torch.Tensor:
        """Embedding [d_vocab, d_model]."""
        return self.hf_model.model.embed_tokens.weight

    def _stack(self, part: str, name: str) -> torch.Tensor:
        return torch.stack([getattr(getattr(block, part), name) for block in self.blocks])

    # Stacked over layers as TransformerLens does: these copy (one layer's views are blocks[l].attn.W_Q ...).
    W_Q = property(lambda self: self._stack("attn", "W_Q"))
    W_K = property(lambda self: self._stack("attn", "W_K"))
    W_V = property(lambda self: self._stack("attn", "W_V"))
    W_O = property(lambda self: self._stack("attn", "W_O"))
    W_in = property(lambda self: self._stack("mlp", "W_in"))
    W_out = property(lambda self: self._stack("mlp", "W_out"))
    b_Q = property(lambda self: self._stack("attn", "b_Q"))
    b_K = property(lambda self: self._stack("attn", "b_K"))
    b_V = property(lambda self: self._stack("attn", "b_V"))
    b_O = property(lambda self: self._stack("attn", "b_O"))
    b_in = property(lambda self: self._stack("mlp", "b_in"))
    b_out = property(lambda self: self._stack("mlp", "b_out"))

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> torch.Tensor:
        """The biases written to the residual stream before `layer` (zeros for Apertus, which has none)."""
        total = self.W_E.new_zeros(self.cfg.d_model)
        for index in range(layer + (1 if mlp_input else 0)):
            total = total + self.blocks[index].attn.b_O.to(total.device)
            if include_mlp_biases and index < layer:
                total = total + self.blocks[index].mlp.b_out.to(total.device)
        return total

    def layer_device(self, layer: int) -> torch.device:
        """Where layer `layer`'s weights live (several devices when loaded with a device_map)."""
        device = self.blocks[layer].ln1.w.device
        if device.type == "meta":
            raise ValueError(
                "Some weights are offloaded (on the 'meta' device), which HookedApertus cannot run: load "
                "with enough GPU/CPU memory for the whole model (e.g. dtype=torch.bfloat16, or "
                "device_map='auto' "
                "without disk offload)."
            )
        return device

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute each head's output in the residual basis (`attn.hook_result`), as in TransformerLens."""
        self.cfg.use_attn_result = use_attn_result

    def xielu_parameters(self) -> pd.DataFrame:
        """Per layer, the xIELU scalars as the activation applies them.

        alpha_p = softplus(raw alpha_p) scales x^2 for x > 0; alpha_n = beta + softplus(raw alpha_n) scales
        expm1(min(x, eps)) - x for x <= 0; beta is the linear slope; eps clamps the negative branch.
        """
        rows = []
        for layer, block in enumerate(self.blocks):
            act = block.mlp.act_fn
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

    # --------------------------------------------------------------------------------------- checks
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
