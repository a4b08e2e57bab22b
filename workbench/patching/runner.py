"""The batched runner: the logits of many one-cell patched runs, stacked along the batch dimension."""

from __future__ import annotations

from collections import Counter

import torch

from workbench.hooked_model import HookedApertus
from workbench.names import act_name
from workbench.patching.components import Cell, Component, runs_of, shift_cell
from workbench.patching.forward import PrefixKV, forward_from, patch_hook
from workbench.patching.runs import ReferenceRuns


def prefetch(runs: ReferenceRuns, spec: Component, cells: list[Cell], neuron_positions=None) -> None:
    """Cache everything a sweep reads from both runs in one forward each (not one per first use)."""
    layers = sorted({c[0] for c in cells})
    names = [spec.hook_name(layer) for layer in layers] + [act_name("resid_pre", la) for la in layers]
    if (spec.pos_axis is not None or neuron_positions is not None) and runs.pairs.mask is None:
        n_layers = runs.model.cfg.n_layers
        names += [act_name(h, la) for la in range(layers[0], n_layers) for h in ("rot_k", "v")]
    for run in ("clean", "corrupted"):
        runs.ensure(run, names)


def differs(runs: ReferenceRuns, spec: Component, cell: Cell, neuron_positions) -> bool:
    """Whether patching this cell changes anything (where both runs agree, patched run = base run)."""
    name = spec.hook_name(cell[0])
    clean = runs.activations("clean", [name])[name]
    corrupted = runs.activations("corrupted", [name])[name]
    where = (slice(None), *spec.index(cell, neuron_positions))
    return not torch.equal(clean[where], corrupted[where])


def suffix_start(spec: Component, cells: list[Cell], padded: bool, neuron_positions=None) -> int:
    """The first position any cell patches, where a position-indexed sweep can start (0 otherwise).

    Causal attention: positions before the patched one hold the base run's values in every layer, so only
    later positions are recomputed, attending to the base run's cached keys and values. Padded batches
    (whose prompts end at different positions) always run whole. Neurons patched at chosen positions start
    at the first of them.
    """
    if padded:
        return 0
    if spec.at_positions and neuron_positions is not None:
        return min(neuron_positions)
    if spec.pos_axis is None:
        return 0
    return min(c[spec.pos_axis] for c in cells)


def patched_logits(
    model: HookedApertus, runs: ReferenceRuns, spec: Component, chunk, direction, full, neuron_positions=None
) -> torch.Tensor:
    """Logits of every variant in `chunk` (variant-major rows): last-token [rows, vocab] unless full.

    Each chunk starts at its lowest patched layer from the base run's cached residual stream, and a variant
    joins the batch at its own layer, so no layer is computed for a variant before its patch.
    """
    pairs = runs.pairs
    base, source = runs_of(direction)
    order = sorted(range(len(chunk)), key=lambda i: chunk[i][0])
    cells = [chunk[i] for i in order]
    start = suffix_start(spec, cells, pairs.mask is not None, neuron_positions)
    if start and spec.at_positions:
        neuron_positions = [p - start for p in neuron_positions]
    elif start:
        cells = [shift_cell(spec, c, start) for c in cells]
    joins = Counter(c[0] for c in cells)  # variants entering the batch at each layer, in layer order
    names = {layer: spec.hook_name(layer) for layer in joins}
    sources = runs.activations(source, list(names.values()))
    hooks, present = [], 0
    for layer in sorted(joins):
        src = sources[names[layer]]
        src = src[:, start:] if start else src
        present += joins[layer]
        mask = torch.zeros((present, *src.shape[1:]), dtype=torch.bool, device=src.device)
        for i in range(present - joins[layer], present):
            mask[i][spec.index(cells[i], neuron_positions)] = True
        hooks.append((names[layer], patch_hook(src, mask[:, None])))
    entry = runs.activations(base, [act_name("resid_pre", layer) for layer in joins])
    entry = {layer: entry[act_name("resid_pre", layer)][:, start:] for layer in joins}
    prefix = None
    if start:  # every layer from the first reads the base run's keys and values before `start`
        layers = range(min(joins), model.cfg.n_layers)
        kv = runs.activations(base, [act_name(h, la) for la in layers for h in ("rot_k", "v")])
        keys = {la: kv[act_name("rot_k", la)] for la in layers}
        values = {la: kv[act_name("v", la)] for la in layers}
        prefix = PrefixKV(keys, values, start)
    last = None if full else pairs.last - start
    with torch.no_grad():
        logits = forward_from(model, joins, entry, pairs.mask, hooks, last, prefix)
    logits = logits.view(len(cells), pairs.n_prompts, *logits.shape[1:])
    unsorted = torch.empty_like(logits)
    unsorted[order] = logits
    return unsorted.flatten(0, 1)
