"""Batched runs of edge-patched variants, and the gradients edge attribution needs.

A variant is a set of edges whose receivers read the alternative run's sender (one edge: edge patching; a
sender and its receivers: path patching; everything outside a circuit: faithfulness). Variants are stacked
along the batch, sorted by the first layer they change, chunked to a memory budget, and each chunk starts
at its first changed layer from the base run's cached residual stream (`patching.forward.forward_from`).
"""

from __future__ import annotations

from collections import Counter

import torch
from tqdm.auto import tqdm

from workbench.circuits.forward import EdgeHooks, Outputs, mean_outputs
from workbench.circuits.graph import Graph
from workbench.inputs import batches
from workbench.names import act_name
from workbench.patching import PatchingExperiment
from workbench.patching.components import runs_of
from workbench.patching.forward import forward_from, forward_with_hooks, free_memory
from workbench.patching.metrics import per_pair_values


def outputs(experiment: PatchingExperiment, run: str) -> Outputs:
    """Every sender's output in the clean or corrupted run, from one cached forward."""
    model = experiment.model
    names = Outputs.names(model) + [act_name("resid_pre", la) for la in range(model.cfg.n_layers)]
    return Outputs.from_cache(model, experiment.activations(run, names))


def alternative(experiment: PatchingExperiment, direction: str, ablation: str) -> Outputs:
    """What patched edges carry: the source run's sender outputs ("patch"), or their mean over pairs."""
    base, source = runs_of(direction)
    if ablation == "patch":
        return outputs(experiment, source)
    if ablation == "mean":
        return mean_outputs(outputs(experiment, source))
    raise ValueError(f"Unknown ablation {ablation!r}: 'patch' (the other run's outputs) or 'mean'.")


def first_layers(graph: Graph, A: torch.Tensor) -> torch.Tensor:
    """Per variant, the first layer whose input changes (the logits count as the last layer)."""
    layers = torch.tensor([min(r.layer, graph.n_layers - 1) for r in graph.receivers])
    touched = A.any(1)  # [variants, receivers]
    big = graph.n_layers - 1
    return torch.where(touched, layers[None], big).min(1).values


def max_variants(experiment: PatchingExperiment, graph: Graph, memory_budget: int | None) -> int:
    """Variants per forward that fit `memory_budget` bytes (default: a quarter of free memory, <= 256)."""
    cfg = experiment.model.cfg
    budget = memory_budget if memory_budget is not None else free_memory(cfg.device) // 4
    senders = len(graph.senders)
    # The residual-sized tensors of a layer, each head's output, and the deltas of one layer's receivers.
    width = (8 + cfg.n_heads + senders + graph.n_heads + 2 * graph.n_kv) * cfg.d_model + 3 * cfg.d_mlp
    per_variant = experiment.n_prompts * (experiment.n_pos * width * 4 + cfg.d_vocab * 4)
    return int(max(1, min(budget // per_variant, 256 if memory_budget is None else 1 << 30)))


def run_variants(
    experiment: PatchingExperiment,
    graph: Graph,
    A: torch.Tensor,
    metric,
    direction: str,
    *,
    ablation: str = "patch",
    max_batch: int | None = None,
    memory_budget: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """The metric of every variant per prompt pair, float64 [variants, pairs]; A [variants, senders,
    receivers] says which edges each variant patches."""
    model, pairs = experiment.model, experiment.pairs
    base, _ = runs_of(direction)
    alt, before = alternative(experiment, direction, ablation), outputs(experiment, base)
    full = callable(metric)
    per_chunk = (
        max(1, max_batch // pairs.n_prompts) if max_batch else max_variants(experiment, graph, memory_budget)
    )
    entry = first_layers(graph, A)
    order = entry.argsort(stable=True).tolist()
    chunks = batches(order, per_chunk)
    values = []
    for chunk in tqdm(chunks, desc="edge patching", disable=not progress or len(chunks) < 2, leave=False):
        start = int(entry[chunk].min())
        hooks = EdgeHooks(model, graph, A[chunk], alt, before, pairs.n_prompts, entry=start)
        resid = experiment.activations(base, [act_name("resid_pre", start)])[act_name("resid_pre", start)]
        last = None if full else pairs.last
        with torch.no_grad():
            logits = forward_from(
                model, Counter({start: len(chunk)}), {start: resid}, pairs.mask,
                hooks.hooks(range(start, graph.n_layers)), last,
            )  # fmt: skip
            values.append(per_pair_values(metric, logits, full, experiment.runs).cpu())
    if not values:
        return torch.empty(0, pairs.n_prompts, dtype=torch.float64)
    out = torch.empty(len(order), values[0].shape[1], dtype=torch.float64)
    out[[i for c in chunks for i in c]] = torch.cat(values)
    return out


def receiver_gradients(
    experiment: PatchingExperiment, graph: Graph, metric, direction: str, steps: int = 0
) -> tuple[dict, torch.Tensor]:
    """d metric / d (receiver input) for every receiver, per pair [pairs, pos, d] (and the metric per pair).

    steps=0: at the base run (EAP). steps>0: averaged over the runs whose embeddings are base + a (source -
    base), a = 1/steps .. 1 (EAP-IG: integrated gradients along the inputs, Hanna et al. 2024).
    """
    model, pairs = experiment.model, experiment.pairs
    base, source = runs_of(direction)
    n_steps = max(steps, 1)
    zero = torch.zeros(1, len(graph.senders), len(graph.receivers), dtype=torch.bool)
    empty = Outputs()
    hooks = EdgeHooks(model, graph, zero.expand(n_steps, -1, -1), empty, empty, pairs.n_prompts, grad=True)
    embeds = [experiment.activations(run, [act_name("embed")])[act_name("embed")] for run in (base, source)]
    alphas = torch.arange(1, n_steps + 1, dtype=torch.float64) / n_steps if steps else torch.zeros(1)

    def interpolate(act, hook):  # the graph starts at the (interpolated) embeddings
        a = alphas.to(act.device, act.dtype).repeat_interleave(pairs.n_prompts)[:, None, None]
        e0, e1 = embeds[0].repeat(n_steps, 1, 1), embeds[1].repeat(n_steps, 1, 1)
        return (e0 + a * (e1 - e0)).detach().requires_grad_(True)

    full = callable(metric)
    tokens = pairs.tokens(base).repeat(n_steps, 1)
    mask = None if pairs.mask is None else pairs.mask.repeat(n_steps, 1)
    edge_hooks = hooks.hooks(range(graph.n_layers))
    with torch.enable_grad():
        last = None if full else pairs.last.repeat(n_steps)
        logits = forward_with_hooks(
            model, tokens, mask, [(act_name("embed"), interpolate), *edge_hooks], last
        )
        per_pair = per_pair_values(metric, logits, full, experiment.runs)  # [steps, pairs]
        per_pair.sum().backward()
    grads = {r: g.view(n_steps, pairs.n_prompts, *g.shape[1:]).mean(0) for r, g in hooks.grads.items()}
    return grads, per_pair.detach().cpu()
