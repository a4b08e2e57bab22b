"""The computational graph of an Apertus model, as circuits see it: nodes, their inputs, and the edges.

Senders (what writes to the residual stream): the embedding, every attention head's output (query head
h's z times its W_O slice) and every MLP's output. Since Apertus has no biases, the residual stream entering
any layer is exactly the sum of the senders before it.

Receivers (what reads the residual stream): each query head's queries ("q", per query head), each KV
head's keys and values ("k", "v", per KV head: in grouped-query attention one KV head serves the
`group` query heads h with h // group == kv_head, so its key/value edges are shared by all of them), each
MLP's input (the residual stream after its layer's attention, before `ln2`), and the logits (the final
residual stream, before `ln_final`). An edge runs from every sender to every receiver downstream of it:
heads of layer l read senders of layers < l, the MLP of layer l also reads layer l's heads, the logits read
all.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Sender:
    kind: str  # "embed", "head", "mlp"
    layer: int  # -1 for the embedding
    head: int = -1

    @property
    def name(self) -> str:
        if self.kind == "embed":
            return "embed"
        return f"L{self.layer}H{self.head}" if self.kind == "head" else f"MLP{self.layer}"


@dataclass(frozen=True)
class Receiver:
    kind: str  # "q", "k", "v", "mlp", "logits"
    layer: int  # n_layers for the logits
    head: int = -1  # query head for q, KV head for k and v

    @property
    def name(self) -> str:
        if self.kind == "logits":
            return "logits"
        if self.kind == "mlp":
            return f"MLP{self.layer}"
        return f"L{self.layer}{'H' if self.kind == 'q' else 'KV'}{self.head}.{self.kind}"


class Graph:
    """Senders, receivers and edges of a model config (`model.cfg`); `edges` is a table, one row per edge."""

    def __init__(self, cfg) -> None:
        self.n_layers, self.n_heads, self.n_kv = cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads
        self.group = self.n_heads // self.n_kv
        self.senders = [Sender("embed", -1)]
        self.receivers: list[Receiver] = []
        for layer in range(self.n_layers):
            self.receivers += [Receiver("q", layer, h) for h in range(self.n_heads)]
            self.receivers += [Receiver(kind, layer, g) for kind in ("k", "v") for g in range(self.n_kv)]
            self.senders += [Sender("head", layer, h) for h in range(self.n_heads)]
            self.receivers.append(Receiver("mlp", layer))
            self.senders.append(Sender("mlp", layer))
        self.receivers.append(Receiver("logits", self.n_layers))
        self.sender_index = {s: i for i, s in enumerate(self.senders)}
        self.receiver_index = {r: i for i, r in enumerate(self.receivers)}
        self.edges = [(s, r) for r in self.receivers for s in self.senders if self.reaches(s, r)]

    @staticmethod
    def reaches(sender: Sender, receiver: Receiver) -> bool:
        """Whether the sender's output is part of the receiver's input."""
        if sender.kind == "embed":
            return True
        if receiver.kind == "mlp":  # reads the residual stream after its own layer's attention
            return sender.layer < receiver.layer or (sender.layer == receiver.layer and sender.kind == "head")
        return sender.layer < receiver.layer

    def query_heads(self, receiver: Receiver) -> list[int]:
        """The query heads that read a receiver (a KV head's group; a query head itself)."""
        if receiver.kind in ("k", "v"):
            return list(range(receiver.head * self.group, (receiver.head + 1) * self.group))
        return [receiver.head] if receiver.kind == "q" else []

    def edge_table(self) -> pd.DataFrame:
        """One row per edge: sender and receiver names, kinds, layers, heads, and the query heads it feeds."""
        return pd.DataFrame(
            {
                "sender": [s.name for s, _ in self.edges],
                "receiver": [r.name for _, r in self.edges],
                "input": [r.kind for _, r in self.edges],
                "sender_layer": [s.layer for s, _ in self.edges],
                "receiver_layer": [r.layer for _, r in self.edges],
                "query_heads": [",".join(map(str, self.query_heads(r))) for _, r in self.edges],
            }
        )

    def find(self, sender: str, receiver: str) -> int:
        """The index of the edge named (sender, receiver), e.g. ("L0H1", "L2KV0.k")."""
        for i, (s, r) in enumerate(self.edges):
            if s.name == sender and r.name == receiver:
                return i
        raise KeyError(
            f"No edge {sender} -> {receiver}: senders are named embed, L<l>H<h>, MLP<l>; receivers "
            "L<l>H<h>.q, L<l>KV<g>.k, L<l>KV<g>.v, MLP<l>, logits, and an edge must run downstream."
        )
