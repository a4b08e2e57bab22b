"""Splicing SAEs into the model: their latents become hook points that can be cached, patched and steered.

``with splice(model, sae):`` replaces the activation at ``sae.cfg.hook_name`` by the SAE's reconstruction
(plus the error term ``x - reconstruction`` when ``use_error_term=True``, which leaves the model's output
unchanged while the latents stay hookable). For the duration the SAE's hook points are hook points of the
model, named after the hook, as SAELens's ``HookedSAETransformer`` names them::

    blocks.1.hook_resid_post.hook_sae_input      [batch, pos, d_in]
    blocks.1.hook_resid_post.hook_sae_acts_pre   [batch, pos, d_sae]
    blocks.1.hook_resid_post.hook_sae_acts_post  [batch, pos, d_sae]   (the latents)
    blocks.1.hook_resid_post.hook_sae_recons     [batch, pos, d_in]
    blocks.1.hook_resid_post.hook_sae_error      [batch, pos, d_in]    (with the error term)
    blocks.1.hook_resid_post.hook_sae_output     [batch, pos, d_in]

so ``model.run_with_cache(..., names_filter=...)`` and ``run_with_hooks`` reach them. With the error term,
the error is computed from an unhooked pass (as SAELens does), so a hook that edits the latents changes the
output by exactly the edit's decoded effect. Hooks on ``hook_name`` itself see the spliced value.

``steering_hook`` adds ``alpha x`` a feature's decoder direction to the activation; ``patch_latents`` runs
the spliced model on one input with chosen latents taken from another run (a patching experiment whose
component is "SAE latents of this hook").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from workbench.sae.model import SAE_HOOKS, SparseAutoencoder

__all__ = ["check_feature", "latent_hook", "patch_latents", "splice", "steering_hook"]


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

    Everything is restored on exit, also after an error: the model's hooks, ``hook_dict`` and ``mod_dict``.
    Two SAEs at one hook point are refused.
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
    added: list[tuple[Any, Any]] = []
    try:
        for sae, name in zip(saes, names):
            sae.training_mode = False
            for point in SAE_HOOKS:
                module = getattr(sae, point)
                full = f"{name}.{point}"
                module.name = full
                model.hook_dict[full] = module
                model.mod_dict[full] = module
            target = model.hook_dict[name]
            handle = target.add_hook(_spliced(sae, use_error_term), dir="fwd", is_permanent=True)
            added.append((target, handle))
        yield model
    finally:
        for target, handle in added:
            handle.hook.remove()
            target.fwd_hooks = [h for h in target.fwd_hooks if h is not handle]
        for sae, name in zip(saes, names):
            for point in SAE_HOOKS:
                getattr(sae, point).remove_hooks("both", including_permanent=True)
                model.hook_dict.pop(f"{name}.{point}", None)
                model.mod_dict.pop(f"{name}.{point}", None)


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


def patch_latents(
    model: Any,
    sae: SparseAutoencoder,
    base: Any,
    source: Any,
    *,
    features: Sequence[int] | None = None,
    positions: slice | Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    source_attention_mask: torch.Tensor | None = None,
    return_type: str = "logits",
) -> Any:
    """Run ``base`` with the SAE spliced in (error term kept) and the chosen latents replaced by their
    values on ``source`` (same shape of input): a patching experiment on the component "SAE latents of this
    hook". ``features`` (default all) and ``positions`` (default all) choose the cells.

    With no features patched the output is the base run's; with all latents at all positions it is the
    base run with the source's reconstruction plus the base's error term. This is a function of its own,
    not a component of :mod:`workbench.patching`, while that package is being restructured.
    """
    name = latent_hook(sae)
    with splice(model, sae, use_error_term=True):
        _, cache = model.run_with_cache(
            source, attention_mask=source_attention_mask, names_filter=[name], return_type=None
        )
        donor = cache[name]
        feats = slice(None) if features is None else torch.as_tensor(list(features), dtype=torch.long)
        where = slice(None) if positions is None else positions

        def patch(acts: torch.Tensor, hook) -> torch.Tensor:
            if donor.shape != acts.shape:
                raise ValueError(
                    f"The source run's latents have shape {tuple(donor.shape)} but the base run's "
                    f"{tuple(acts.shape)}: give inputs of the same length (pad them together)."
                )
            patched = acts.clone()
            rows = patched[:, where]
            rows[..., feats] = donor[:, where][..., feats].to(acts.device)
            patched[:, where] = rows
            return patched

        return model.run_with_hooks(
            base, attention_mask=attention_mask, fwd_hooks=[(name, patch)], return_type=return_type
        )


def check_feature(sae: SparseAutoencoder, feature: int) -> int:
    if not isinstance(feature, int) or isinstance(feature, bool) or not 0 <= feature < sae.cfg.d_sae:
        raise IndexError(
            f"feature {feature!r} is out of range: this SAE has {sae.cfg.d_sae} latents "
            f"(0..{sae.cfg.d_sae - 1})."
        )
    return feature
