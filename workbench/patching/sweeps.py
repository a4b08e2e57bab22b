"""Sweep planning: which cells a sweep patches, and how they group into chunks of batched variants."""

from __future__ import annotations

from collections.abc import Sequence

from workbench.hooked_model import HookedApertus
from workbench.inputs import batches
from workbench.patching.components import Cell, Component


def plan_cells(
    model: HookedApertus,
    n_pos: int,
    spec: Component,
    *,
    layer: int | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> list[Cell]:
    """Every cell of a component's sweep (neurons: of `layer`; restricted to `layers`/`positions`)."""
    cfg = model.cfg
    for what, given in (("layers", layers), ("positions", positions)):
        if given is not None and len(given) == 0:
            raise ValueError(
                f"{what}=[] selects nothing to patch: pass None for all {what}, or at least one."
            )
    if spec.point is not None:  # one hook point, in one layer
        if layers is not None and spec.layer not in layers:
            raise ValueError(
                f"{spec.name} is a hook point of layer {spec.layer} only, not of layers {list(layers)}."
            )
        chosen = [spec.layer]
    elif spec.name == "neurons":
        if layer is None:
            raise ValueError(
                f"Neuron sweeps patch the {cfg.d_mlp} neurons of one layer: pass layer=0..{cfg.n_layers - 1}."
            )
        chosen = [model.check_layer(layer)]
    else:
        chosen = [model.check_layer(x) for x in layers] if layers is not None else list(range(cfg.n_layers))
    pos = list(range(n_pos)) if positions is None else [check_pos(p, n_pos) for p in positions]
    ranges = {
        "pos": pos,
        "head": range(cfg.n_heads),
        "kv_head": range(cfg.n_key_value_heads),
        "neuron": range(cfg.d_mlp),
        **{axis: range(size) for axis, size in spec.sizes},
    }
    cells: list[Cell] = [(x,) for x in chosen]
    for axis in spec.axes:
        cells = [(*c, i) for c in cells for i in ranges[axis]]
    return cells


def check_pos(p: int, n_pos: int) -> int:
    if not isinstance(p, int) or not -n_pos <= p < n_pos:
        raise IndexError(f"Position {p!r} is out of range: the prompts have {n_pos} tokens (0..{n_pos - 1}).")
    return p % n_pos


def check_cells(model: HookedApertus, n_pos: int, spec: Component, cells: list[Cell]) -> None:
    if not cells:
        raise ValueError("No cells to patch: pass at least one cell, or cells=None for the whole sweep.")
    layer = cells[0][0] if spec.name == "neurons" else None
    valid = set(plan_cells(model, n_pos, spec, layer=layer))
    for cell in cells:
        if cell not in valid:
            raise IndexError(f"Cell {cell} is not a {spec.name} cell: its axes are {('layer', *spec.axes)}.")


def plan_chunks(spec: Component, cells: list[Cell], todo: list[int], padded: bool, per_chunk: int):
    """Chunks of cell indices, at most `per_chunk` variants each.

    Unpadded position-indexed sweeps get one group per position, so that each chunk runs only from its
    position on (see `runner.suffix_start`).
    """
    at = spec.pos_axis
    if at is not None and not padded:
        groups = [[i for i in todo if cells[i][at] == p] for p in sorted({cells[i][at] for i in todo})]
    else:
        groups = [todo]
    return [chunk for g in groups for chunk in batches(g, per_chunk)]


def check_size(what: str, value, unit: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"{what}={value!r}: give a whole number of {unit}, at least 1, or None for the default."
        )


def neuron_positions(spec: Component, positions, n_pos: int) -> list[int] | None:
    """Where a neuron (or latent, or whole-hook) sweep patches each cell (checked, non-negative, sorted);
    None: every position."""
    if not spec.at_positions or positions is None:
        return None
    return sorted({check_pos(p, n_pos) for p in positions})
