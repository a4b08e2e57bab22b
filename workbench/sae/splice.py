"""Splicing SAEs into the model: their latents become hook points that can be cached, patched and steered.

``with splice(model, sae):`` replaces the activation at ``sae.cfg.hook_name`` by the SAE's reconstruction
(plus the error term ``x - reconstruction`` when ``use_error_term=True``, which leaves the model's output
unchanged while the latents stay hookable). For the duration the SAE's hook points are hook points of the
model (added with ``model.extra_hook_points``), named after the hook, as SAELens's ``HookedSAETransformer``
names them::

    blocks.1.hook_resid_post.hook_sae_input      [batch, pos, d_in]
    blocks.1.hook_resid_post.hook_sae_acts_pre   [batch, pos, d_sae]
    blocks.1.hook_resid_post.hook_sae_acts_post  [batch, pos, d_sae]   (the latents)
    blocks.1.hook_resid_post.hook_sae_recons     [batch, pos, d_in]
    blocks.1.hook_resid_post.hook_sae_error      [batch, pos, d_in]    (with the error term)
    blocks.1.hook_resid_post.hook_sae_output     [batch, pos, d_in]

so ``model.run_with_cache(..., names_filter=...)`` and ``run_with_hooks`` reach them. With the error term,
the error is computed from an unhooked pass (as SAELens does), so a hook that edits the latents changes the
output by exactly the edit's decoded effect. Hooks on ``hook_name`` itself see the spliced value.

``steering_hook`` adds ``alpha x`` a feature's decoder direction to the activation. To patch latents, build
a :class:`workbench.patching.PatchingExperiment` inside the ``with`` block and run the component
``("sae_latents", sae)`` (one latent per cell; ``("hook", latent_hook(sae))`` patches them all at once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from workbench.sae.model import SAE_HOOKS, SparseAutoencoder

__all__ = ["check_feature", "latent_hook", "splice", "steering_hook"]


def latent_hook(sae: SparseAutoencoder, point: str = "hook_sae_acts_post") -> str:
    """The model hook name of one of a spliced SAE's hook points (default: its latents)."""
    if point not in SAE_HOOKS:
        raise ValueError(f"{point!r} is not an SAE hook point: choose one of {', '.join(SAE_HOOKS)}.")
    return f"{sae.cfg.hook_name}.{point}"


def _spliced(sae: SparseAutoencoder, use_error_term: bool) -> Callable:
    def hook(activation: torch.Tensor, hook) -> torch.Tensor:
        acts = sae.encode(activation)
        recon = sae.decode(acts)
        flat_in = sae.flatten(activation).to(recon.dtype)
        if use_error_term:
            edited = sae.hook_sae_acts_pre.fwd_hooks or sae.hook_sae_acts_post.fwd_hooks
            if edited or sae.hook_sae_input.fwd_hooks or sae.hook_sae_recons.fwd_hooks:
                with torch.no_grad():  # the true error: an unhooked pass of the SAE
                    pre = (flat_in - sae.b_dec * sae.cfg.apply_b_dec_to_input) @ sae.W_enc + sae.b_enc
                    clean = sae.activation(pre) @ sae.W_dec + sae.b_dec
            else:
                clean = recon
            recon = recon + sae.hook_sae_error(flat_in - clean)
        return sae.unflatten(sae.hook_sae_output(recon), activation)

    return hook


@contextmanager
def splice(
    model: Any, saes: SparseAutoencoder | Sequence[SparseAutoencoder], *, use_error_term: bool = False
) -> Iterator[Any]:
    """Splice SAEs into ``model`` at their hooks for the ``with`` block (see the module docstring).

    The SAEs' hook points are added with ``model.extra_hook_points`` (so they are ordinary hook points
    for the block); on exit, also after an error, they and the splicing hooks are removed and the model
    computes what it computed before. Two SAEs at one hook point are refused.
    """
    saes = [saes] if isinstance(saes, SparseAutoencoder) else list(saes)
    names = [sae.cfg.hook_name for sae in saes]
    for sae, name in zip(saes, names):
        if not name:
            raise ValueError(f"{sae!r} has no hook_name: set sae.cfg.hook_name to the hook it reads.")
        model.check_hook_name(name)
        if f"{name}.hook_sae_acts_post" in model.hook_dict:
            raise ValueError(f"An SAE is already spliced at {name}: leave its splice(...) block first.")
    if len(set(names)) != len(names):
        raise ValueError(f"Two SAEs for one hook point: {names}. Splice one SAE per hook.")
    points = {f"{name}.{point}": getattr(sae, point) for sae, name in zip(saes, names) for point in SAE_HOOKS}
    added: list[tuple[Any, Any]] = []
    with model.extra_hook_points(points):
        try:
            for sae, name in zip(saes, names):
                sae.training_mode = False
                target = model.hook_dict[name]
                handle = target.add_hook(_spliced(sae, use_error_term), dir="fwd", is_permanent=True)
                added.append((target, handle))
            yield model
        finally:
            for target, handle in added:
                handle.hook.remove()
                target.fwd_hooks = [h for h in target.fwd_hooks if h is not handle]


def steering_hook(
    sae: SparseAutoencoder, feature: int, alpha: float, positions: slice | Sequence[int] | None = None
) -> tuple[str, Callable]:
    """A ``(hook name, fn)`` pair for ``run_with_hooks`` that adds ``alpha`` x feature ``feature``'s unit
    decoder direction to the activation at ``sae.cfg.hook_name`` (all positions, or ``positions``). No
    splice needed: the SAE only supplies the direction."""
    check_feature(sae, feature)
    direction = sae.feature_directions()[feature]

    def add(activation: torch.Tensor, hook) -> torch.Tensor:
        delta = (alpha * direction).to(activation.device, activation.dtype)
        delta = delta.reshape(activation.shape[2:]) if sae.cfg.reshape_z else delta
        where = slice(None) if positions is None else positions
        activation[:, where] = activation[:, where] + delta
        return activation

    return sae.cfg.hook_name, add


def check_feature(sae: SparseAutoencoder, feature: int) -> int:
    if not isinstance(feature, int) or isinstance(feature, bool) or not 0 <= feature < sae.cfg.d_sae:
        raise IndexError(
            f"feature {feature!r} is out of range: this SAE has {sae.cfg.d_sae} latents "
            f"(0..{sae.cfg.d_sae - 1})."
        )
    return feature
