"""Where training activations come from: a harvest's shards streamed from disk, or a tensor in memory.

Both give the same stream for the same seed: each epoch visits the shards in a seeded order and each
shard's rows in a seeded order, and batches are consecutive slices of that stream. A source can start
at any step (:meth:`batches`), which is how an interrupted training run resumes exactly where it stopped.
A harvest source keeps one shard in memory at a time (plus less than one batch carried over).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch

from workbench.data.alignment import LabelledSentence, TokenLabelledDataset
from workbench.probing.harvest import Harvest

__all__ = ["HarvestSource", "TensorSource", "text_dataset"]


def text_dataset(texts: list[str], name: str = "texts") -> TokenLabelledDataset:
    """Plain texts as a dataset whose every word is labelled, for :func:`workbench.probing.harvest` to
    keep every token but BOS: encode it with ``subtokens="every"`` (``text_dataset(t).encode(tokenizer,
    subtokens="every")``). Words are split on whitespace, so the text round-trips exactly."""
    sentences = []
    for i, text in enumerate(texts):
        words = tuple(text.split())
        if not words:
            raise ValueError(f"Text {i} is empty or only whitespace: drop it.")
        if " ".join(words) != text:
            raise ValueError(
                f"Text {i} has other whitespace than single spaces between words: normalise it first "
                "(' '.join(text.split()))."
            )
        space = tuple([True] * (len(words) - 1) + [False])
        sentences.append(LabelledSentence(words, ("token",) * len(words), space, source=f"{name} {i}"))
    return TokenLabelledDataset.from_sentences(sentences, ["token"], name=name)


class _Source:
    """Shards (lists of rows) visited in a seeded order; subclasses say how to read shard i."""

    hook: str
    sizes: list[int]
    width: int

    def read(self, shard: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def n_rows(self) -> int:
        return sum(self.sizes)

    def fingerprint(self) -> str:
        raise NotImplementedError

    def _order(self, seed: int, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self.sizes), generator=gen).tolist()

    def _rows(self, seed: int, epoch: int, shard: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 65_537 + shard)
        return self.read(shard)[torch.randperm(self.sizes[shard], generator=gen)]

    def batches(self, batch_size: int, seed: int = 0, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Endless ``[batch_size, width]`` float32 batches, from batch number ``start_step`` on."""
        if self.n_rows < batch_size:
            raise ValueError(
                f"The source has {self.n_rows} activations, fewer than one batch of {batch_size}: "
                "harvest more text or use a smaller batch_size."
            )
        skip = start_step * batch_size
        epoch, offset = divmod(skip, self.n_rows)
        carry: list[torch.Tensor] = []
        carried = 0
        while True:
            for shard in self._order(seed, epoch):
                if offset >= self.sizes[shard]:
                    offset -= self.sizes[shard]
                    continue
                rows = self._rows(seed, epoch, shard)[offset:]
                offset = 0
                while len(rows):
                    take = rows[: batch_size - carried]
                    rows = rows[len(take) :]
                    carry.append(take)
                    carried += len(take)
                    if carried == batch_size:
                        yield torch.cat(carry).float()
                        carry, carried = [], 0
            epoch += 1


class HarvestSource(_Source):
    """One hook of a :func:`workbench.probing.harvest` folder, read shard by shard."""

    def __init__(self, harvest: Harvest | str | Path, hook: str) -> None:
        self.harvest = harvest if isinstance(harvest, Harvest) else Harvest.open(harvest)
        if not self.harvest.complete:
            raise RuntimeError(
                f"The harvest in {self.harvest.folder} is incomplete: call harvest(...) again to finish it."
            )
        if hook not in self.harvest.hooks:
            raise KeyError(f"Hook {hook!r} was not harvested; this harvest has {self.harvest.hooks}.")
        self.hook = hook
        self.shards = list(self.harvest.manifest["shards"])
        self.sizes = [int(s["tokens"]) for s in self.shards]
        self.width = int(self.harvest.shard_shape(0, hook)[-1])

    def read(self, shard: int) -> torch.Tensor:
        return self.harvest.shard_tensor(shard, self.hook)

    def fingerprint(self) -> str:
        m = self.harvest.manifest
        return hashlib.sha256(repr((m["model"], m["data"], self.hook, self.sizes)).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"HarvestSource({self.hook!r}: {self.n_rows} x {self.width} in {len(self.sizes)} shards)"


class TensorSource(_Source):
    """Activations ``[n, width]`` already in memory, cut into shards of ``shard_rows`` as a harvest is."""

    def __init__(self, activations: torch.Tensor, hook: str = "", shard_rows: int = 65_536) -> None:
        if activations.ndim != 2 or not activations.is_floating_point():
            raise ValueError(
                f"Activations must be a float tensor [n, width]; got {activations.dtype} "
                f"{tuple(activations.shape)} (flatten heads first: x.flatten(-2))."
            )
        self.data, self.hook, self.width = activations, hook, activations.shape[1]
        n = len(activations)
        self.starts = list(range(0, n, shard_rows))
        self.sizes = [min(shard_rows, n - s) for s in self.starts]

    def read(self, shard: int) -> torch.Tensor:
        return self.data[self.starts[shard] : self.starts[shard] + self.sizes[shard]]

    def fingerprint(self) -> str:
        head = self.data[:64].float().contiguous().numpy().tobytes()
        return hashlib.sha256(head + repr((self.hook, self.sizes)).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"TensorSource({self.hook!r}: {self.n_rows} x {self.width})"
