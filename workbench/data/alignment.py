"""Word-level labels carried onto tokens: the token-labelled datasets probes and token classifiers train on.

A :class:`TokenLabelledDataset` is a list of sentences, each a sequence of words with one label (or None)
per word and whether a space follows it. The tagged-grammar sentences of :mod:`workbench.data.corpus`
(:meth:`TokenLabelledDataset.from_tagged`) and CoNLL-U files (:func:`workbench.data.conllu.read_conllu`)
both become one.

:meth:`TokenLabelledDataset.encode` tokenizes each sentence's text and maps every token back to the word it
came from through the tokenizer's character offsets, so it works for any fast tokenizer, whether it splits
words or not. A word's label goes on its first sub-token (``subtokens="first"``, as transformers' token
classification does) or on every sub-token (``"every"``); everything else is ``-100`` (:data:`IGNORE`), which
includes special tokens such as ``<s>`` and padding. Real text never fails: a token that runs across a word
boundary (``).`` or French ``'hôpital`` after ``l'``) belongs to the word in which it starts, a word left
without a first token of its own is not labelled, and :class:`AlignmentReport` counts such words, and those
that became the unknown token, by label (``tokenize="words"`` keeps every label instead).
"""

from __future__ import annotations

import bisect
import hashlib
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch

from workbench.inputs import pad_token_id
from workbench.token_text import display_tokens, token_bytes

__all__ = [
    "IGNORE",
    "AlignmentError",
    "AlignmentReport",
    "AlignmentWarning",
    "EncodedDataset",
    "LabelledSentence",
    "TokenLabelledDataset",
]

#: The label of tokens that carry none (transformers' and PyTorch's cross-entropy ``ignore_index``).
IGNORE = -100

Subtokens = Literal["first", "every"]
Tokenize = Literal["sentence", "words"]


class AlignmentError(ValueError):
    """No sentence of a dataset could be encoded (each one that cannot is skipped and named, see
    :class:`AlignmentReport`)."""


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
        self,
        tokenizer: Any,
        *,
        subtokens: Subtokens = "first",
        prepend_bos: bool = True,
        tokenize: Tokenize = "sentence",
        warn_above: float = 0.01,
        max_length: int | None = None,
    ) -> EncodedDataset:
        """Tokenize every sentence and put each word's label on its first (or every) sub-token.

        ``tokenizer`` must be a fast (Rust) tokenizer, as its character offsets tie tokens to words;
        ``prepend_bos`` adds the BOS token when the tokenizer's template does not (as ``HookedApertus`` does).

        ``tokenize="sentence"`` tokenizes each sentence's text as a whole, as the model reads text. A token
        belongs to the word in which it starts, and a word whose first character is covered by a token that
        started in the previous word (``).``, ``."``, ``'hôpital`` after ``l'``) has no first token of its
        own: it is not labelled, and counted in :attr:`EncodedDataset.report`. ``tokenize="words"``
        tokenizes each word on its own with its preceding space: the same characters, split where the words
        split, so every word keeps its label (but the model may see tokens it rarely saw in training).

        The report also counts the labelled words that contain the unknown token; an
        :class:`AlignmentWarning` is issued when either share of labelled words is above ``warn_above``. A
        sentence that cannot be encoded (the tokenizer fails, or it is longer than ``max_length``, by
        default the tokenizer's ``model_max_length``) is skipped with a warning naming its source; the
        encoded dataset's ``dataset`` holds the sentences kept, in order.
        """
        if subtokens not in ("first", "every"):
            raise ValueError(f"subtokens must be 'first' or 'every', not {subtokens!r}.")
        if tokenize not in ("sentence", "words"):
            raise ValueError(f"tokenize must be 'sentence' or 'words', not {tokenize!r}.")
        if (
            isinstance(warn_above, bool)
            or not isinstance(warn_above, (int, float))
            or not 0 <= warn_above <= 1
        ):
            raise ValueError(f"warn_above is a share of words between 0 and 1, not {warn_above!r}.")
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                f"{type(tokenizer).__name__} is not a fast tokenizer: "
                "aligning words to tokens needs character "
                "offsets. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
            )
        limit = _length_limit(tokenizer, max_length)
        encoder = _SentenceEncoder(tokenizer, self.label_names, subtokens, prepend_bos, tokenize)
        kept, skipped = [], []
        for sentence in self.sentences:
            try:
                row = encoder.encode(sentence, limit)
            except Exception as error:  # one bad sentence must not lose the file: it is named instead
                skipped.append((_where(sentence), f"{type(error).__name__}: {error}"))
                continue
            kept.append((sentence, row))
        if not self.sentences:
            raise ValueError(
                f"{self.name or 'The dataset'} has no sentences: read a file that has some, or check the "
                "slice you took."
            )
        if not kept:
            raise AlignmentError(
                f"No sentence of {self.name or 'the dataset'} could be encoded; the first: "
                f"{skipped[0][0]}: {skipped[0][1]}"
            )
        encoded = EncodedDataset(
            self.label_names,
            [],
            subtokens,
            TokenLabelledDataset([s for s, _ in kept], self.label_names, self.name),
            pad_id=pad_token_id(tokenizer),
        )
        for _, (ids, labels, words, types) in kept:
            encoded.input_ids.append(ids)
            encoded.labels.append(labels)
            encoded.word_ids.append(words)
            encoded.types.append(types)
        encoded.type_names = tuple(encoder.type_ids)
        encoded.report = encoder.report(tokenize, skipped)
        encoded.report.warn(warn_above)
        return encoded


class AlignmentWarning(UserWarning):
    """Many words lost their label (no token of their own, or the unknown token), or sentences were
    skipped."""


def _is_punct(word: str) -> bool:
    return not any(ch.isalnum() for ch in word)


def _where(sentence: LabelledSentence) -> str:
    return sentence.source or repr(sentence.text[:60])


def _length_limit(tokenizer: Any, max_length: int | None) -> int | None:
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer or None, not {max_length!r}.")
        return max_length
    limit = getattr(tokenizer, "model_max_length", None)
    # transformers writes a huge sentinel (1e30) when a tokenizer has no limit.
    return int(limit) if isinstance(limit, int) and limit < 10**9 else None


class _SentenceEncoder:
    """Encodes one sentence at a time and counts, per label, the words seen, dropped and unknown."""

    def __init__(self, tokenizer, label_names, subtokens: str, prepend_bos: bool, tokenize: str) -> None:
        self.tokenizer, self.subtokens, self.prepend_bos = tokenizer, subtokens, prepend_bos
        self.split = _tokens_of_words if tokenize == "words" else _tokens_of_text
        self.index = {name: i for i, name in enumerate(label_names)}
        self.label_names = tuple(label_names)
        self.type_ids: dict[str, int] = {}
        self.words: Counter = Counter()
        self.dropped: Counter = Counter()
        self.unknown: Counter = Counter()

    def encode(
        self, sentence: LabelledSentence, limit: int | None
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """Token ids, label ids, word of each token (-1: none) and word type of each labelled token."""
        ids, words, firsts = self.split(self.tokenizer, sentence)
        bos = self.tokenizer.bos_token_id
        if self.prepend_bos and bos is not None and ids[:1] != [bos]:
            ids, words, firsts = [bos, *ids], [-1, *words], [False, *firsts]
        if limit is not None and len(ids) > limit:
            raise AlignmentError(f"{len(ids)} tokens, more than max_length={limit}")
        labelled = {w for w, first in zip(words, firsts) if first}
        unk = self.tokenizer.unk_token_id
        unknown = {w for token, w in zip(ids, words) if w >= 0 and unk is not None and token == unk}
        labels, types = [], []
        for w, first in zip(words, firsts):
            label = None if w < 0 or w not in labelled else sentence.labels[w]
            if label is None or not (first or self.subtokens == "every"):
                labels.append(IGNORE)
                types.append(-1)
            else:
                labels.append(self.index[label])
                types.append(self.type_ids.setdefault(sentence.words[w], len(self.type_ids)))
        for w, label in enumerate(sentence.labels):
            if label is not None:
                self.words[label] += 1
                self.dropped[label] += w not in labelled
                self.unknown[label] += w in unknown
        return ids, labels, words, types

    def report(self, tokenize: str, skipped: list[tuple[str, str]]) -> AlignmentReport:
        def series(counts: Counter) -> pd.Series:
            return pd.Series([counts[n] for n in self.label_names], self.label_names, dtype="int64")

        return AlignmentReport(
            tokenize, series(self.words), series(self.dropped), series(self.unknown), skipped
        )


def _offsets_to_words(
    text: str, spans: list[tuple[int, int]], offsets: list[tuple[int, int]], special: list[int]
) -> tuple[list[int], list[bool]]:
    """Per token, the word it starts in (-1: special or whitespace) and whether it starts at that word's
    first character (the word's own first token)."""
    starts = [start for start, _ in spans]
    words, firsts = [], []
    for (start, end), is_special in zip(offsets, special):
        # Metaspace and byte-level tokenizers fold the preceding space into the token: look past it.
        while start < end and text[start].isspace():
            start += 1
        w = bisect.bisect_right(starts, start) - 1
        if is_special or start >= end or w < 0 or start >= spans[w][1]:
            words.append(-1)
            firsts.append(False)
            continue
        # A word's first token starts at its first character; a byte-level tokenizer may split that
        # character's bytes over several tokens, which then share the start: only the first counts.
        firsts.append(start == spans[w][0] and not (words and words[-1] == w))
        words.append(w)
    return words, firsts


def _tokens_of_text(tokenizer: Any, sentence: LabelledSentence) -> tuple[list[int], list[int], list[bool]]:
    """The sentence tokenized as one text; tokens tied to words through the character offsets."""
    text, spans = sentence.text_and_spans()
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    offsets, special = list(enc["offset_mapping"]), list(enc["special_tokens_mask"])
    words, firsts = _offsets_to_words(text, spans, offsets, special)
    return list(enc["input_ids"]), words, firsts


def _tokens_of_words(tokenizer: Any, sentence: LabelledSentence) -> tuple[list[int], list[int], list[bool]]:
    """Each word tokenized on its own, after the space that precedes it in the text."""
    ids, words, firsts = [], [], []
    for w, word in enumerate(sentence.words):
        piece = (" " if w > 0 and sentence.space_after[w - 1] else "") + word
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        tokens, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if w > 0 and not piece.startswith(" ") and _spurious_marker(tokenizer, tokens, offsets):
            # A SentencePiece-style tokenizer puts a space marker before every text it is given (a token of
            # its own before punctuation); a word glued to the one before must not gain that space.
            tokens, offsets = tokens[1:], offsets[1:]
        lead, first = len(piece) - len(word), True
        for token, (start, end) in zip(tokens, offsets):
            content = end > max(start, lead)  # more than the preceding space
            ids.append(token)
            words.append(w if content else -1)
            firsts.append(content and first)
            first = first and not content
    return ids, words, firsts


def _spurious_marker(tokenizer: Any, tokens: list[int], offsets: list[tuple[int, int]]) -> bool:
    """Whether the first token is a space marker the tokenizer added (blank or unknown, over the same
    characters as the token after it)."""
    if len(tokens) < 2 or tuple(offsets[0]) != tuple(offsets[1]):
        return False
    return tokens[0] == tokenizer.unk_token_id or not token_bytes(tokenizer, tokens[:1])[0].strip()


@dataclass
class AlignmentReport:
    """What :meth:`TokenLabelledDataset.encode` did with the labelled words, by label: how many were seen
    (``words``), how many lost their label because no token starts at their first character
    (``dropped``), how many contain the unknown token (``unknown``; they keep their label), and which
    sentences were skipped (``skipped``: ``(source, reason)``)."""

    tokenize: str
    words: pd.Series
    dropped: pd.Series
    unknown: pd.Series
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def table(self) -> pd.DataFrame:
        """One row per label: words, dropped, unknown, and the shares of the last two."""
        frame = pd.DataFrame({"words": self.words, "dropped": self.dropped, "unknown": self.unknown})
        total = frame["words"].where(frame["words"] > 0)
        frame["dropped_share"] = (frame["dropped"] / total).fillna(0.0)
        frame["unknown_share"] = (frame["unknown"] / total).fillna(0.0)
        return frame

    @property
    def n_words(self) -> int:
        return int(self.words.sum())

    @property
    def n_dropped(self) -> int:
        return int(self.dropped.sum())

    @property
    def n_unknown(self) -> int:
        return int(self.unknown.sum())

    def summary(self) -> str:
        """One line per problem found (empty when there is none)."""
        lines = []
        if self.n_dropped:
            lines.append(
                f"{self.n_dropped} of {self.n_words} labelled words ({self.n_dropped / self.n_words:.1%}) "
                f"have no token of their own and are not labelled ({_by_label(self.dropped)}): a token "
                "that starts in the previous word covers their first character. encode(..., "
                "tokenize='words') keeps every label."
            )
        if self.n_unknown:
            lines.append(
                f"{self.n_unknown} of {self.n_words} labelled words ({self.n_unknown / self.n_words:.1%}) "
                f"became the unknown token ({_by_label(self.unknown)}): the probe sees no trace of what "
                "they were. Use a tokenizer that knows these words."
            )
        if self.skipped:
            named = "; ".join(f"{where}: {reason}" for where, reason in self.skipped[:5])
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            lines.append(f"Skipped {len(self.skipped)} sentences that cannot be encoded: {named}{more}.")
        return "\n".join(lines)

    def warn(self, above: float) -> None:
        """Issue an :class:`AlignmentWarning` when a share of words is above ``above`` or sentences were
        skipped."""
        total = max(self.n_words, 1)
        if self.skipped or self.n_dropped / total > above or self.n_unknown / total > above:
            warnings.warn(self.summary() + f" (warn_above={above})", AlignmentWarning, stacklevel=3)


def _by_label(counts: pd.Series) -> str:
    return ", ".join(f"{label} {n}" for label, n in counts[counts > 0].sort_values(ascending=False).items())


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
    report: AlignmentReport | None = None

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
        """One row per token of a sentence: position, token id (and its display text, see
        :func:`workbench.token_text.display_tokens`), word, label (None when -100)."""
        shown = display_tokens(tokenizer, self.input_ids[sentence]) if tokenizer is not None else None
        rows = []
        for pos, (tid, w, label) in enumerate(
            zip(self.input_ids[sentence], self.word_ids[sentence], self.labels[sentence])
        ):
            rows.append(
                {
                    "position": pos,
                    "token_id": tid,
                    "token": shown[pos] if shown is not None else None,
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
