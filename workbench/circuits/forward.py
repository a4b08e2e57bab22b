"""Receivers with inputs of their own: the hooks behind edge patching, path patching and edge attribution.

In a normal forward every head's queries, keys and values and every MLP read the same residual stream.
Here each receiver r reads `resid + sum_u A[u, r] * (alt_u - run_u)`: the residual stream of this run with
the patched senders' contributions swapped for the alternative run's (`alt_u`, the source run's output or
its mean) -- for one edge that is exactly "the receiver sees the sender as in the other run, everything
else as in this run". In gradient mode every receiver gets its own copy of its input, whose gradient is
d metric / d (receiver input), what edge attribution multiplies by (alt_u - base_u).

The queries/keys/values are recomputed from the receiver's input with the layer's own norm weight and
W_Q/W_K/W_V (norm in float32, as `HookedRMSNorm`); the MLP's and the logits' inputs replace the output of
`ln2`/`ln_final`'s normalisation. An MLP's input is thus resid_mid before `ln2` (the norm is part of the
receiver, as in EAP), and its copy feeds only the MLP, never the skip connection: its gradient is the MLP
branch's alone, as TransformerLens's backward hook on the bridge's `hook_mlp_in` measures it.
"""

from __future__ import annotations

import torch

from workbench.circuits.graph import Graph, Receiver, Sender
from workbench.names import act_name


def normalized(norm, x: torch.Tensor) -> torch.Tensor:
    """`HookedRMSNorm`'s normalisation of x (before its weight), without firing its hook points."""
    x32 = x.to(torch.float32)
    scale = torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + norm.norm.variance_epsilon)
    return (x32 / scale).to(x.dtype)


class Outputs:
    """Sender outputs of one run: embedding [rows, pos, d], heads per layer [rows, pos, head, d], MLPs."""

    def __init__(self) -> None:
        self.embed: torch.Tensor | None = None
        self.heads: dict[int, torch.Tensor] = {}
        self.mlps: dict[int, torch.Tensor] = {}

    def get(self, s: Sender) -> torch.Tensor:
        if s.kind == "embed":
            return self.embed
        return self.heads[s.layer][:, :, s.head] if s.kind == "head" else self.mlps[s.layer]

    @classmethod
    def from_cache(cls, model, cache: dict) -> Outputs:
        out = cls()
        out.embed = cache[act_name("embed")]
        for layer in range(model.cfg.n_layers):
            out.heads[layer] = head_outputs(model, layer, cache[act_name("z", layer)])
            out.mlps[layer] = cache[act_name("mlp_out", layer)]
        return out

    @staticmethod
    def names(model) -> list[str]:
        """The hook points a run's sender outputs are read from."""
        n = model.cfg.n_layers
        return [act_name("embed"), *(act_name(x, la) for la in range(n) for x in ("z", "mlp_out"))]


def head_outputs(model, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Each head's write to the residual stream, [rows, pos, head, d_model] (z times its slice of W_O)."""
    return torch.einsum("bphd,hdm->bphm", z, model.blocks[layer].attn.W_O)


class EdgeHooks:
    """Forward hooks giving each receiver its input (see the module docstring).

    A: [variants, senders, receivers] coefficients (1 = this edge takes the alternative run's sender).
    alt: the alternative run's `Outputs`, [prompts or 1, pos, ...]. before: this run's outputs of the
    senders upstream of `entry` (the layer the forward starts at), [prompts, pos, ...].
    grad: give every receiver its own input and keep d metric / d input in `self.grads[receiver]`.
    """

    def __init__(self, model, graph: Graph, A, alt: Outputs, before: Outputs, n_prompts, entry=0, grad=False):
        self.model, self.graph, self.alt, self.grad = model, graph, alt, grad
        self.n_prompts, self.n_variants = n_prompts, A.shape[0]
        self.A = A.to(model.cfg.dtype)
        self.run = Outputs()
        rows = self.n_variants
        self.run.embed = None if before.embed is None else before.embed.repeat(rows, 1, 1)
        for layer in range(entry):
            self.run.heads[layer] = before.heads[layer].repeat(rows, 1, 1, 1)
            self.run.mlps[layer] = before.mlps[layer].repeat(rows, 1, 1)
        self.streams: dict[str, torch.Tensor] = {}
        self.grads: dict[Receiver, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------ the deltas
    def _alt(self, s: Sender, rows: int) -> torch.Tensor:
        a = self.alt.get(s)
        return a.repeat(rows // a.shape[0], *([1] * (a.ndim - 1)))

    def deltas(self, receivers: list[Receiver]) -> torch.Tensor | None:
        """sum_u A[u, r] (alt_u - run_u) per row, [rows, len(receivers), pos, d]; None when all zero."""
        g = self.graph
        r_idx = torch.tensor([g.receiver_index[r] for r in receivers])
        coeff = self.A[:, :, r_idx]  # [variants, senders, receivers]
        used = [s for s in g.senders if any(g.reaches(s, r) for r in receivers)]
        used = [s for s in used if bool(coeff[:, g.sender_index[s]].any())]
        if not used:
            return None
        run = [self.run.get(s) for s in used]
        rows = run[0].shape[0]
        diff = torch.stack([self._alt(s, rows) - x for s, x in zip(used, run)], 1)  # [rows, S, pos, d]
        c = coeff[:, [g.sender_index[s] for s in used]].repeat_interleave(self.n_prompts, 0)
        return torch.einsum("bspd,bsr->brpd", diff, c.to(diff.device))

    def inputs(self, resid: torch.Tensor, receivers: list[Receiver]):
        """Each receiver's input [rows, pos, n, d], or None when none of them changes (and no gradient)."""
        delta = self.deltas(receivers)
        if delta is None and not self.grad:
            return None
        x = resid[:, :, None, :].expand(-1, -1, len(receivers), -1)
        x = x + delta.transpose(1, 2) if delta is not None else x.clone()
        if self.grad:
            x.register_hook(lambda g, rs=tuple(receivers): self._keep(rs, g))
        return x

    def _keep(self, receivers, g: torch.Tensor) -> None:
        for i, r in enumerate(receivers):
            self.grads[r] = g[:, :, i].detach()

    # ------------------------------------------------------------------------------------- the hooks
    def hooks(self, layers: range) -> list:
        hooks = [(act_name("embed"), self._embed)] if layers.start == 0 else []
        for layer in layers:
            hooks += [
                (act_name("resid_pre", layer), self._stream("pre")),
                (act_name("q", layer), self._qkv(layer, "q")),
                (act_name("k", layer), self._qkv(layer, "k")),
                (act_name("v", layer), self._qkv(layer, "v")),
                (act_name("z", layer), self._heads(layer)),
                (act_name("resid_mid", layer), self._stream("mid")),
                (act_name("normalized", layer, "ln2"), self._mlp_in(layer)),
                (act_name("mlp_out", layer), self._mlp(layer)),
            ]
        last = self.model.cfg.n_layers - 1
        hooks += [
            (act_name("resid_post", last), self._stream("final")),
            (act_name("normalized"), self._logits),
        ]
        return hooks

    def _embed(self, act, hook):
        self.run.embed = act

    def _stream(self, key):
        def hook(act, hook):
            self.streams[key] = act

        return hook

    def _heads(self, layer):
        def hook(z, hook):
            self.run.heads[layer] = head_outputs(self.model, layer, z)

        return hook

    def _mlp(self, layer):
        def hook(act, hook):
            self.run.mlps[layer] = act

        return hook

    def _qkv(self, layer, kind):
        g, block = self.graph, self.model.blocks[layer]
        n = g.n_heads if kind == "q" else g.n_kv
        receivers = [Receiver(kind, layer, h) for h in range(n)]
        weight = {"q": block.attn.W_Q, "k": block.attn.W_K, "v": block.attn.W_V}

        def hook(act, hook):
            x = self.inputs(self.streams["pre"], receivers)
            if x is None:
                return None
            normed = block.ln1.w * normalized(block.ln1, x)  # [rows, pos, n, d_model]
            return torch.einsum("bpnd,nde->bpne", normed, weight[kind]).to(act.dtype)

        return hook

    def _mlp_in(self, layer):
        receiver = [Receiver("mlp", layer)]
        norm = self.model.blocks[layer].ln2

        def hook(act, hook):
            x = self.inputs(self.streams["mid"], receiver)
            return None if x is None else normalized(norm, x[:, :, 0])

        return hook

    def _logits(self, act, hook):
        x = self.inputs(self.streams["final"], [Receiver("logits", self.graph.n_layers)])
        return None if x is None else normalized(self.model.ln_final, x[:, :, 0])


def mean_outputs(out: Outputs) -> Outputs:
    """Each sender's output averaged over prompts, [1, pos, ...] (mean ablation)."""
    mean = Outputs()
    mean.embed = out.embed.mean(0, keepdim=True)
    mean.heads = {la: h.mean(0, keepdim=True) for la, h in out.heads.items()}
    mean.mlps = {la: m.mean(0, keepdim=True) for la, m in out.mlps.items()}
    return mean
