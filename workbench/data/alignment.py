"""Word-level labels carried onto tokens: the token-labelled datasets probes and token classifiers train on.

A :class:`TokenLabelledDataset` is a list of sentences, each a sequence of words with one label (or None)
per word and whether a space follows it. The tagged-grammar sentences of :mod:`workbench.data.corpus`
(:meth:`TokenLabelledDataset.from_tagged`) and CoNLL-U files (:func:`workbench.data.conllu.read_conllu`)
both become one.

:meth:`TokenLabelledDataset.encode` tokenizes each sentence's text and maps every token back to the word it
came from through the tokenizer's character offsets, so it works for any fast tokenizer, whether it splits
words or not. A word's label goes on its first sub-token (``subtokens="first"``, as transformers' token
classification does) or on every sub-token (``"every"``); everything else is ``-100`` (:data:`IGNORE`), which
includes special tokens such as ``<s>`` and padding. A word that gets no token of its own, or a token that
straddles two words, raises :class:`AlignmentError` instead of shifting labels silently.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch

__all__ = [
    "IGNORE",
    "AlignmentError",
    "EncodedDataset",
    "LabelledSentence",
    "TokenLabelledDataset",
]

#: The label of tokens that carry none (transformers' and PyTorch's cross-entropy ``ignore_index``).
IGNORE = -100

Subtokens = Literal["first", "every"]


class AlignmentError(ValueError):
    """Words and tokens cannot be matched one-to-many: a word has no token, or a token spans two words."""


@dataclass(frozen=True)
class LabelledSentence:
    """Words with one label each (None: not labelled) and whether a space follows each word.

    ``source`` says where the sentence came from (e.g. ``"en.conllu:12 sent_id=3"``) for error messages.
    """

    words: tuple[str, ...]
    labels: tuple[str | None, ...]
    space_after: tuple[bool, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not self.words:
            raise ValueError(f"Sentence {self.source or ''} has no words.".replace("  ", " "))
        if not len(self.words) == len(self.labels) == len(self.space_after):
            raise ValueError(
                f"Sentence {self.source!r}: {len(self.words)} words, {len(self.labels)} labels and "
                f"{len(self.space_after)} space flags; give one of each per word."
            )
        for i, word in enumerate(self.words):
            if not word or word != word.strip():
                raise ValueError(
                    f"Sentence {self.source!r}, word {i} is {word!r}: "
                    "words must be non-empty without surrounding "
                    "whitespace (spaces between words come from space_after)."
                )

    @property
    def text(self) -> str:
        return self.text_and_spans()[0]

    def text_and_spans(self) -> tuple[str, list[tuple[int, int]]]:
        """The sentence's text and each word's ``(start, end)`` character span in it."""
        parts, spans, at = [], [], 0
        for word, space in zip(self.words, self.space_after):
            spans.append((at, at + len(word)))
            parts.append(word + (" " if space else ""))
            at += len(parts[-1])
        return "".join(parts).rstrip(" "), spans

    def __len__(self) -> int:
        return len(self.words)


@dataclass
class TokenLabelledDataset:
    """Sentences of labelled words, with the label set in a fixed order (class ``i`` is
    ``label_names[i]``)."""

    sentences: list[LabelledSentence]
    label_names: tuple[str, ...]
    name: str = ""

    def __post_init__(self) -> None:
        self.label_names = tuple(self.label_names)
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"label_names has duplicates: {self.label_names}.")
        known = set(self.label_names)
        for sentence in self.sentences:
            unknown = {label for label in sentence.labels if label is not None and label not in known}
            if unknown:
                raise ValueError(
                    f"Sentence {sentence.source or sentence.text!r} "
                    f"has labels {sorted(unknown)} that are not in "
                    f"label_names {list(self.label_names)}: add them, "
                    "or leave label_names=None to collect them."
                )

    @classmethod
    def from_sentences(
        cls, sentences: Sequence[LabelledSentence], label_names: Sequence[str] | None = None, name: str = ""
    ) -> TokenLabelledDataset:
        """A dataset whose label set is ``label_names`` or, by default, the labels seen, sorted."""
        if label_names is None:
            label_names = sorted({lab for s in sentences for lab in s.labels if lab is not None})
        return cls(list(sentences), tuple(label_names), name)

    @classmethod
    def from_tagged(
        cls, sentences: Sequence[Any], labelling: str = "pos", label_names: Sequence[str] | None = None
    ) -> TokenLabelledDataset:
        """From :class:`workbench.data.corpus.TaggedSentence` objects: ``labelling`` is "pos", "roles" or
        "depths".

        Punctuation attaches to the previous word without a space, exactly as ``TaggedSentence.text`` writes
        it.
        """
        from workbench.data import corpus

        columns = {"pos": corpus.UPOS_TAGS, "roles": corpus.ROLES, "depths": None}
        if labelling not in columns:
            raise ValueError(f"labelling must be one of {list(columns)}, not {labelling!r}.")
        out = []
        for i, s in enumerate(sentences):
            words = tuple(s.words)
            space = tuple(not (j + 1 < len(words) and _is_punct(words[j + 1])) for j in range(len(words)))
            labels = tuple(str(label) for label in getattr(s, labelling))
            out.append(LabelledSentence(words, labels, space, source=f"tagged sentence {i}"))
        default = columns[labelling]
        if label_names is None and default is None:
            label_names = [str(d) for d in sorted({int(lab) for s in out for lab in s.labels})]
        return cls(out, tuple(label_names or default), name=f"grammar {labelling}")

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TokenLabelledDataset(self.sentences[index], self.label_names, self.name)
        return self.sentences[index]

    def subset(self, indices: Sequence[int]) -> TokenLabelledDataset:
        """The sentences at ``indices`` (e.g. a probe's test split), with the same label set."""
        return TokenLabelledDataset([self.sentences[int(i)] for i in indices], self.label_names, self.name)

    def label_counts(self) -> pd.Series:
        """How many words carry each label (unlabelled words are not counted)."""
        counts = Counter(lab for s in self.sentences for lab in s.labels if lab is not None)
        return pd.Series(
            {name: counts.get(name, 0) for name in self.label_names}, name="words", dtype="int64"
        )

    def encode(
        self, tokenizer: Any, *, subtokens: Subtokens = "first", prepend_bos: bool = True
    ) -> EncodedDataset:
        """Tokenize every sentence and put each word's label on its first (or every) sub-token.

        ``tokenizer`` must be a fast (Rust) tokenizer, as its character offsets tie tokens to words;
        ``prepend_bos`` adds the BOS token when the tokenizer's template does not (as ``HookedApertus`` does).
        """
        if subtokens not in ("first", "every"):
            raise ValueError(f"subtokens must be 'first' or 'every', not {subtokens!r}.")
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                f"{type(tokenizer).__name__} is not a fast tokenizer: "
                "aligning words to tokens needs character "
                "offsets. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
            )
        index = {name: i for i, name in enumerate(self.label_names)}
        type_ids: dict[str, int] = {}
        encoded = EncodedDataset(self.label_names, [], subtokens, self)
        for s_index, sentence in enumerate(self.sentences):
            ids, words = _tokens_to_words(tokenizer, sentence, prepend_bos)
            labels, types, seen = [], [], set()
            for w in words:
                label = None if w < 0 else sentence.labels[w]
                first = w >= 0 and w not in seen
                seen.add(w)
                if label is None or not (first or subtokens == "every"):
                    labels.append(IGNORE)
                    types.append(-1)
                else:
                    labels.append(index[label])
                    types.append(type_ids.setdefault(sentence.words[w], len(type_ids)))
            missing = set(range(len(sentence))) - seen
            if missing:
                w = min(missing)
                raise AlignmentError(
                    f"Sentence {s_index} ({sentence.source or sentence.text!r}): "
                    f"word {w} {sentence.words[w]!r} "
                    "gets no token of its own (the tokenizer merged "
                    "or dropped it), so its label has nowhere to go."
                )
            encoded.input_ids.append(ids)
            encoded.labels.append(labels)
            encoded.word_ids.append(words)
            encoded.types.append(types)
        encoded.type_names = tuple(type_ids)
        encoded.pad_id = _pad_id(tokenizer)
        return encoded


def _is_punct(word: str) -> bool:
    return not any(ch.isalnum() for ch in word)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else (tokenizer.eos_token_id or 0)


def _tokens_to_words(
    tokenizer: Any, sentence: LabelledSentence, prepend_bos: bool
) -> tuple[list[int], list[int]]:
    """Token ids and, per token, the index of the word it belongs to (-1 for special and whitespace
    tokens)."""
    text, spans = sentence.text_and_spans()
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids, offsets, special = (
        list(enc["input_ids"]),
        list(enc["offset_mapping"]),
        list(enc["special_tokens_mask"]),
    )
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is not None and ids[:1] != [bos]:
        ids, offsets, special = [bos, *ids], [(0, 0), *offsets], [1, *special]
    starts = [start for start, _ in spans]
    words = []
    for token, (start, end), is_special in zip(ids, offsets, special):
        # Metaspace and byte-level tokenizers fold the preceding space into the token: look past it.
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if is_special or start >= end:
            words.append(-1)
            continue
        w = bisect.bisect_right(starts, start) - 1
        if w < 0 or start >= spans[w][1]:
            words.append(-1)
            continue
        if end > spans[w][1]:
            piece = tokenizer.convert_ids_to_tokens(token)
            raise AlignmentError(
                f"Sentence {sentence.source or text!r}: token "
                f"{piece!r} covers {text[start:end]!r}, across the "
                f"boundary of words {w} {sentence.words[w]!r} and "
                f"{w + 1} {sentence.words[w + 1]!r}; labels per word "
                "cannot be placed on it. Put a space between these "
                "words (space_after) or use another tokenizer."
            )
        words.append(w)
    return ids, words


@dataclass
class EncodedDataset:
    """A :class:`TokenLabelledDataset` tokenized: per sentence, token ids, label ids (``-100`` where none),
    the word each token belongs to (-1: special) and the word type of each labelled token (its form, for
    control tasks: ``type_names[t]``; -1 elsewhere)."""

    label_names: tuple[str, ...]
    input_ids: list[list[int]]
    subtokens: str
    dataset: TokenLabelledDataset
    labels: list[list[int]] = field(default_factory=list)
    word_ids: list[list[int]] = field(default_factory=list)
    types: list[list[int]] = field(default_factory=list)
    type_names: tuple[str, ...] = ()
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_labelled(self) -> int:
        return sum(1 for row in self.labels for label in row if label != IGNORE)

    @property
    def n_tokens(self) -> int:
        return sum(len(row) for row in self.input_ids)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Right-padded tensors for the sentences ``indices``: input_ids, attention_mask, labels, types."""
        width = max(len(self.input_ids[i]) for i in indices)

        def padded(rows: list[list[int]], fill: int) -> torch.Tensor:
            return torch.tensor([row + [fill] * (width - len(row)) for row in rows], dtype=torch.long)

        return {
            "input_ids": padded([self.input_ids[i] for i in indices], self.pad_id),
            "attention_mask": padded([[1] * len(self.input_ids[i]) for i in indices], 0),
            "labels": padded([self.labels[i] for i in indices], IGNORE),
            "types": padded([self.types[i] for i in indices], -1),
        }

    def tokens_frame(self, sentence: int, tokenizer: Any | None = None) -> pd.DataFrame:
        """One row per token of a sentence: position, token id (and text), word, label (None when -100)."""
        rows = []
        for pos, (tid, w, label) in enumerate(
            zip(self.input_ids[sentence], self.word_ids[sentence], self.labels[sentence])
        ):
            rows.append(
                {
                    "position": pos,
                    "token_id": tid,
                    "token": tokenizer.convert_ids_to_tokens(tid) if tokenizer is not None else None,
                    "word": self.dataset.sentences[sentence].words[w] if w >= 0 else None,
                    "label": self.label_names[label] if label != IGNORE else None,
                }
            )
        frame = pd.DataFrame(rows)
        return frame if tokenizer is not None else frame.drop(columns="token")

    def fingerprint(self) -> str:
        """A hash of the token ids, labels, word types and label names (a harvest checks it on resume)."""
        h = hashlib.sha256()
        h.update(repr((self.label_names, self.type_names, self.subtokens)).encode())
        for ids, labels, types in zip(self.input_ids, self.labels, self.types):
            h.update(repr((ids, labels, types)).encode())
        return h.hexdigest()[:16]
