"""What a sweep can patch: components, their hooks and cell axes, and where a cell sits in an activation.

Besides the named components (`COMPONENTS`, a hook in every layer), a sweep can patch one hook point of one
layer, named by the hook (`HOOK_KINDS`): `("sae_latents", sae or its hook)` patches the latents of an SAE
spliced in with `workbench.sae.splice`, one latent per cell; `("hook", name)` patches any hook point of a
block whole. Their string form, `"sae_latents:blocks.1.hook_resid_post"`, is the result's component name.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workbench.names import act_name

Prompts = str | Sequence[str] | torch.Tensor
Metric = str | Callable[[torch.Tensor], torch.Tensor]
Cell = tuple[int, ...]
Index = Callable[[Cell, Sequence[int] | None], tuple]

EVERY = slice(None)


@dataclass(frozen=True)
class Component:
    """What one sweep patches: a hook in every layer, and how a cell's index addresses its activation.

    `index(cell, neuron_positions)` is the cell's index in one prompt's activation (batch dimension removed);
    `neuron_positions` only matters to components patched at the sweep's positions (`at_positions`: neurons,
    SAE latents, whole hook points; None: every position).
    A component of one hook point (`point`) lives in one `layer`; `sizes` are its own axes' lengths and
    `width` its activation's per-position width (for the memory estimate).
    """

    name: str
    hook: str  # act_name's short name, e.g. "resid_pre", "z", "post"
    axes: tuple[str, ...]  # the cell's axes after the layer
    about: str
    index: Index
    at_positions: bool = False
    point: str | None = None
    layer: int | None = None
    sizes: tuple[tuple[str, int], ...] = ()
    width: int = 0

    def hook_name(self, layer: int) -> str:
        return self.point if self.point is not None else act_name(self.hook, layer)

    @property
    def pos_axis(self) -> int | None:
        """Where "pos" sits in a cell (the layer is entry 0), or None for all-position components."""
        return 1 + self.axes.index("pos") if "pos" in self.axes else None


def _at_pos(cell, _):  # [pos, d_model]
    return (cell[1],)


def _head_at_pos(cell, _):  # hook_z [pos, head, d_head]
    return (cell[2], cell[1])


def _head_all_pos(cell, _):  # q/k/v/z [pos, head, d_head]
    return (EVERY, cell[1])


def _pattern(cell, _):  # [head, query, key]
    return (cell[1],)


def _neuron(cell, positions):  # [pos, d_mlp]; SAE latents [pos, d_sae]
    return (EVERY if positions is None else list(positions), cell[1])


def _unit_at_pos(cell, _):  # SAE latents [pos, d_sae]
    return (cell[1], cell[2])


def _whole(cell, positions):  # any [pos, ...] activation
    return (EVERY if positions is None else list(positions),)


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("resid_pre", "resid_pre", ("pos",), "residual stream entering the layer", _at_pos),
        Component("resid_mid", "resid_mid", ("pos",), "residual stream between attention and MLP", _at_pos),
        Component("resid_post", "resid_post", ("pos",), "residual stream leaving the layer", _at_pos),
        Component("attn_out", "attn_out", ("pos",), "attention output (all heads)", _at_pos),
        Component("mlp_out", "mlp_out", ("pos",), "MLP output", _at_pos),
        Component("heads", "z", ("head",), "one head's output (hook_z), all positions", _head_all_pos),
        Component("heads_by_pos", "z", ("head", "pos"), "one head's output at one position", _head_at_pos),
        Component("q", "q", ("head",), "one head's queries, all positions", _head_all_pos),
        Component("k", "k", ("kv_head",), "one KV head's keys, all positions", _head_all_pos),
        Component("v", "v", ("kv_head",), "one KV head's values, all positions", _head_all_pos),
        Component("pattern", "pattern", ("head",), "one head's attention pattern", _pattern),
        Component(
            "neurons", "post", ("neuron",), "one xIELU neuron (mlp.hook_post) of a layer", _neuron, True
        ),
    )
}

#: Components of one hook point: (cell axes after the layer, index, patched at the sweep's positions, about).
HOOK_KINDS: dict[str, tuple[tuple[str, ...], Index, bool, str]] = {
    "sae_latents": (("latent",), _neuron, True, "one SAE latent at every position (or positions=)"),
    "sae_latents_by_pos": (("pos", "latent"), _unit_at_pos, False, "one SAE latent at one position"),
    "hook": ((), _whole, True, "a whole hook point, at every position (or positions=)"),
    "hook_by_pos": (("pos",), _at_pos, False, "a whole hook point at one position"),
}
# Hook points whose axis 1 is not the position: a position index would address heads or queries.
NOT_BY_POSITION = ("hook_pattern", "hook_attn_scores", "hook_q_normed", "hook_k_normed")
LATENTS = "hook_sae_acts_post"

METRICS = ("logit_diff", "answer_prob", "kl")
DIRECTIONS = {"denoise": "denoise", "denoising": "denoise", "noise": "noise", "noising": "noise"}


def component_spec(name: str) -> Component:
    if isinstance(name, tuple) or (isinstance(name, str) and ":" in name):
        raise ValueError(
            f"{name!r} names a component of one hook point: patch it through a PatchingExperiment "
            "(exp.run(...)), which reads the hook point's size from the model."
        )
    if name in COMPONENTS:
        return COMPONENTS[name]
    close = difflib.get_close_matches(str(name), COMPONENTS, n=3, cutoff=0.4)
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise ValueError(f"Unknown component {name!r}: choose one of {', '.join(COMPONENTS)}.{hint}")


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(
            f"Unknown direction {direction!r}: 'denoise' (run corrupted, patch clean in) or 'noise' "
            "(run clean, patch corrupted in)."
        )
    return DIRECTIONS[direction]


def runs_of(direction: str) -> tuple[str, str]:
    """(the run that is patched, the run patched in) for a direction."""
    return ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")


def cell_index(spec: Component, cell: Cell, neuron_positions) -> tuple:
    """The index of one cell in one prompt's activation (its batch dimension removed)."""
    return spec.index(cell, neuron_positions)


def shift_cell(spec: Component, cell: Cell, start: int) -> Cell:
    at = spec.pos_axis
    return (*cell[:at], cell[at] - start, *cell[at + 1 :])


def parse_hook_component(component: Any) -> tuple[str, str, str]:
    """(kind, hook, hook point patched) of `("sae_latents", sae or hook)`, `("hook", name)` or their string
    form `"kind:hook"`; an SAE stands for its `cfg.hook_name`."""
    if isinstance(component, str):
        kind, _, target = component.partition(":")
    elif isinstance(component, tuple) and len(component) == 2:
        kind, target = component
    else:
        raise ValueError(
            f"A hook-point component is (kind, hook), e.g. ('sae_latents', sae), not {component!r}."
        )
    if kind not in HOOK_KINDS:
        close = difflib.get_close_matches(str(kind), HOOK_KINDS, n=2, cutoff=0.4)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ValueError(
            f"Unknown hook-point component {kind!r}: choose one of {', '.join(HOOK_KINDS)}.{hint}"
        )
    target = getattr(getattr(target, "cfg", None), "hook_name", target)  # an SAE: the hook it reads
    if not isinstance(target, str) or not target:
        raise ValueError(f"{kind!r} needs a hook name (or an SAE), not {target!r}.")
    if kind.startswith("sae_"):
        target = target.removesuffix("." + LATENTS)
        return kind, target, f"{target}.{LATENTS}"
    return kind, target, target


def hook_component(model: Any, component: Any, width_of: Callable[[str], int]) -> Component:
    """The Component of one hook point (see the module docstring); `width_of(point)` is the activation's last
    dimension (the experiment reads it from its clean run)."""
    kind, target, point = parse_hook_component(component)
    if kind.startswith("sae_") and point not in model.hook_dict:
        raise ValueError(
            f"No SAE is spliced at {target}: build and run the experiment inside "
            "`with workbench.sae.splice(model, sae):` (with or without use_error_term)."
        )
    model.check_hook_name(point)
    match = re.match(r"blocks\.(\d+)\.", point)
    if match is None:
        raise ValueError(
            f"{point} is not inside a block: the patched runs enter at a layer, so a hook-point component "
            "patches a hook of blocks.{layer}."
        )
    if point.split(".")[-1] in NOT_BY_POSITION:
        raise ValueError(
            f"{point} is not laid out [batch, pos, ...]: patch it with a named component (e.g. 'pattern')."
        )
    axes, index, at_positions, about = HOOK_KINDS[kind]
    width = width_of(point) if "latent" in axes or ".hook_sae_" in point else 0
    sizes = (("latent", width),) if "latent" in axes else ()
    layer = int(match.group(1))
    return Component(f"{kind}:{target}", point, axes, about, index, at_positions, point, layer, sizes, width)
