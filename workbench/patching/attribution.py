"""Attribution patching: every cell of several components from one forward and backward of the base run."""

from __future__ import annotations

import torch

from workbench.hooked_model import HookedApertus
from workbench.patching.components import Cell, Component, Metric, runs_of
from workbench.patching.forward import forward_with_hooks
from workbench.patching.metrics import per_pair_values
from workbench.patching.runs import ReferenceRuns


def attribution_per_pair(
    model: HookedApertus,
    runs: ReferenceRuns,
    cells: dict[Component, list[Cell]],
    metric: Metric,
    direction: str,
    base_per_pair: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Each component's estimate per cell and prompt pair, float64 [cells, pairs] ([cells, 1] for a metric
    that returns one scalar per batch).

    A pair's estimate is its base metric + sum over the cell of (source - base) * d metric / d activation:
    the first-order Taylor expansion of exact patching. Rows of a batch are independent, so the gradient of
    the sum over pairs gives every pair's own derivative in one backward.
    """
    base, source = runs_of(direction)
    names = sorted({spec.hook_name(c[0]) for spec, cs in cells.items() for c in cs})
    sources = runs.activations(source, names)
    acts, grads = {}, {}

    def capture(act, hook):
        acts[hook.name] = act.detach()
        act.register_hook(lambda g, name=hook.name: grads.__setitem__(name, g.detach()))

    def leaf(act, hook):  # the weights are frozen: the graph starts at the embeddings
        return act.detach().requires_grad_(True)

    hooks = [("hook_embed", leaf)] + [(n, capture) for n in names]
    full = callable(metric)
    pairs = runs.pairs
    with torch.enable_grad():
        last = None if full else pairs.last
        logits = forward_with_hooks(model, pairs.tokens(base), pairs.mask, hooks, last)
        per_pair = per_pair_values(metric, logits, full, runs)
        per_pair.sum().backward()
    by_pair = per_pair.shape[1] > 1 or pairs.n_prompts == 1
    results = {}
    for spec, spec_cells in cells.items():
        products = {}
        for name in {spec.hook_name(c[0]) for c in spec_cells}:
            product = (sources[name] - acts[name]).double() * grads[name].double()
            products[name] = product if by_pair else product.sum(0, keepdim=True)
        rows = []
        for c in spec_cells:
            product = products[spec.hook_name(c[0])]
            rows.append(product[(slice(None), *spec.index(c, None))].reshape(product.shape[0], -1).sum(1))
        results[spec.name] = base_per_pair.cpu()[None] + torch.stack(rows).cpu()
    return results
