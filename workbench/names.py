"""Hook-point names, and the one numbering of the residual stream.

Every analysis names hook points through `act_name` instead of assembling strings, so a name is spelled in
one place. `act_name` is TransformerLens's `get_act_name` with the Apertus hook points it does not know
(QK-norm outputs, rotated queries and keys) put under `attn`.

The residual stream is numbered as TransformerLens's `ActivationCache.accumulated_resid` numbers it:
stream `i` (0 <= i < n_layers) is `blocks.{i}.hook_resid_pre`, the input of layer i (stream 0 is the
embedding); stream `n_layers` is the final `blocks.{n_layers-1}.hook_resid_post`, the input of the
unembedding. Labels: "0_pre", "1_pre", ..., "final_post".
"""

from __future__ import annotations

from transformer_lens.utilities import get_act_name

# Per-head attention activations that get_act_name would place outside `attn`.
_ATTENTION = {
    "q_normed",
    "k_normed",
    "rot_q",
    "rot_k",
    "q",
    "k",
    "v",
    "z",
    "result",
    "pattern",
    "attn_scores",
}


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """The full hook name: act_name("resid_pre", 3) == "blocks.3.hook_resid_pre",
    act_name("post", 1) == "blocks.1.mlp.hook_post", act_name("scale", 2, "ln1") == "blocks.2.ln1.hook_scale",
    act_name("scale") == "ln_final.hook_scale"; a full name is returned unchanged."""
    if layer is not None and name in _ATTENTION:
        return f"blocks.{int(layer)}.attn.hook_{name}"
    return get_act_name(name, layer, layer_type)


def resid_names(n_layers: int) -> list[str]:
    """Hook names of residual streams 0..n_layers (see the module docstring)."""
    return [act_name("resid_pre", i) for i in range(n_layers)] + [act_name("resid_post", n_layers - 1)]


def resid_labels(n_layers: int) -> list[str]:
    """TransformerLens's labels of residual streams 0..n_layers: "0_pre", ..., "final_post"."""
    return [f"{i}_pre" for i in range(n_layers)] + ["final_post"]


def resid_name(stream: int, n_layers: int) -> str:
    """The hook name of residual stream `stream` (0..n_layers)."""
    if not isinstance(stream, int) or isinstance(stream, bool) or not 0 <= stream <= n_layers:
        raise IndexError(
            f"residual stream {stream!r} is out of range: this model has streams 0..{n_layers} "
            f"(0 = the embedding, i = the input of layer i, {n_layers} = the final stream)."
        )
    return resid_names(n_layers)[stream]
