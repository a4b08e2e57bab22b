"""What a sweep can patch: components, their hooks and cell axes, and where a cell sits in an activation."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Prompts = str | Sequence[str] | torch.Tensor
Metric = str | Callable[[torch.Tensor], torch.Tensor]
Cell = tuple[int, ...]


@dataclass(frozen=True)
class Component:
    """What one sweep patches: a hook in every layer, and how a cell's index addresses its activation."""

    name: str
    hook: str  # per-layer hook name after "blocks.{l}."
    axes: tuple[str, ...]  # the cell's axes after the layer
    about: str


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("resid_pre", "hook_resid_pre", ("pos",), "residual stream entering the layer"),
        Component("resid_mid", "hook_resid_mid", ("pos",), "residual stream between attention and MLP"),
        Component("resid_post", "hook_resid_post", ("pos",), "residual stream leaving the layer"),
        Component("attn_out", "hook_attn_out", ("pos",), "attention output (all heads)"),
        Component("mlp_out", "hook_mlp_out", ("pos",), "MLP output"),
        Component("heads", "attn.hook_z", ("head",), "one head's output (hook_z), all positions"),
        Component("heads_by_pos", "attn.hook_z", ("head", "pos"), "one head's output at one position"),
        Component("q", "attn.hook_q", ("head",), "one head's queries, all positions"),
        Component("k", "attn.hook_k", ("kv_head",), "one KV head's keys, all positions"),
        Component("v", "attn.hook_v", ("kv_head",), "one KV head's values, all positions"),
        Component("pattern", "attn.hook_pattern", ("head",), "one head's attention pattern"),
        Component(
            "neurons", "mlp.hook_post", ("neuron",), "one xIELU neuron (mlp.hook_post) of a chosen layer"
        ),
    )
}

METRICS = ("logit_diff", "answer_prob", "kl")
DIRECTIONS = {"denoise": "denoise", "denoising": "denoise", "noise": "noise", "noising": "noise"}


def component_spec(name: str) -> Component:
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


def cell_index(spec: Component, cell: Cell, neuron_positions) -> tuple:
    """The index of one cell in one prompt's activation (its batch dimension removed)."""
    every = slice(None)
    if spec.axes == ("pos",):  # [pos, d_model]
        return (cell[1],)
    if spec.axes == ("head", "pos"):  # hook_z [pos, head, d_head]
        return (cell[2], cell[1])
    if spec.name == "pattern":  # [head, query, key]
        return (cell[1],)
    if spec.name == "neurons":  # [pos, d_mlp]
        return (every if neuron_positions is None else list(neuron_positions), cell[1])
    return (every, cell[1])  # q/k/v/z: [pos, head, d_head]


def shift_cell(spec: Component, cell: Cell, start: int) -> Cell:
    at = 1 + spec.axes.index("pos")
    return (*cell[:at], cell[at] - start, *cell[at + 1 :])
