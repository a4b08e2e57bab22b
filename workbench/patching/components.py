"""What a sweep can patch: components, their hooks and cell axes, and where a cell sits in an activation."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    `neuron_positions` only matters to neurons (None: every position).
    """

    name: str
    hook: str  # act_name's short name, e.g. "resid_pre", "z", "post"
    axes: tuple[str, ...]  # the cell's axes after the layer
    about: str
    index: Index

    def hook_name(self, layer: int) -> str:
        return act_name(self.hook, layer)

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


def _neuron(cell, positions):  # [pos, d_mlp]
    return (EVERY if positions is None else list(positions), cell[1])


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
            "neurons", "post", ("neuron",), "one xIELU neuron (mlp.hook_post) of a chosen layer", _neuron
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


def runs_of(direction: str) -> tuple[str, str]:
    """(the run that is patched, the run patched in) for a direction."""
    return ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")


def cell_index(spec: Component, cell: Cell, neuron_positions) -> tuple:
    """The index of one cell in one prompt's activation (its batch dimension removed)."""
    return spec.index(cell, neuron_positions)


def shift_cell(spec: Component, cell: Cell, start: int) -> Cell:
    at = spec.pos_axis
    return (*cell[:at], cell[at] - start, *cell[at + 1 :])
