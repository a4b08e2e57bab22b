"""CoNLL-U files (Universal Dependencies) as token-labelled datasets, read with the `conllu` package.

Any column can be the label: ``"upos"``, ``"xpos"``, ``"deprel"``, ``"lemma"``, ``"form"``, ``"head"``,
``"feats"`` (the whole string), one FEATS or MISC key (``"feats:Number"``, ``"misc:Translit"``), or a function
of the parsed `conllu` token. Two kinds of line need care, and get it as UD defines them:

* A multiword token (``3-4  don't``) is one surface token made of the syntactic words 3 and 4 (``do``,
  ``n't``), which carry the annotation. With ``multiword="words"`` (the default) the sentence is the
  syntactic words, each with its own label, separated by spaces (``do n't``). With ``"surface"`` the text is
  the surface tokens as written (``don't``) and a multiword token's label joins its words' labels
  (``AUX+PART``).
* An empty node (``8.1``) is a word of the enhanced graph only, absent from the text: it is skipped.

Spacing follows ``SpaceAfter=No`` in MISC. Files are UTF-8 (a byte-order mark is accepted). Each file is
checked line by line (ten tab-separated columns, IDs numbered 1, 2, 3, ..., ranges and empty nodes where UD
allows them), and any problem, a byte that is not UTF-8 or a column function that raises included, raises
:class:`ConlluError` with the file, the line number and the reason.

Each line's fields are parsed by the `conllu` package (``parse_line``). The sentence structure is checked
here rather than read with ``conllu.parse_incr``, because ``parse_incr`` reports a bad field without its
line number and accepts what UD forbids (word IDs out of order, ranges past the sentence, space-separated
columns).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from conllu.exceptions import ParseException
from conllu.parser import DEFAULT_FIELDS, parse_line

from workbench.data.alignment import LabelledSentence, TokenLabelledDataset

__all__ = ["ConlluError", "parse_conllu", "read_conllu", "COLUMNS"]

#: The ten CoNLL-U columns, in file order.
COLUMNS = ("id", "form", "lemma", "upos", "xpos", "feats", "head", "deprel", "deps", "misc")

Column = str | Callable[[dict], Any]
_WORD = re.compile(r"^[1-9][0-9]*$")
_RANGE = re.compile(r"^([1-9][0-9]*)-([1-9][0-9]*)$")
_EMPTY = re.compile(r"^(0|[1-9][0-9]*)\.([1-9][0-9]*)$")


class ConlluError(ValueError):
    """A malformed CoNLL-U file: the message names the file, the line and the problem."""

    def __init__(self, source: str, line: int, reason: str) -> None:
        super().__init__(f"{source}, line {line}: {reason}")
        self.source, self.line, self.reason = source, line, reason


@dataclass
class _Line:
    number: int
    text: str
    token: Any = None  # the conllu Token of a word or multiword line


@dataclass
class _Block:
    start: int
    comments: list[_Line]
    words: list[_Line]  # word lines in order
    ranges: dict[int, _Line]  # first word id -> multiword line
    metadata: dict[str, str]


def read_conllu(
    path: str | Path,
    column: Column = "upos",
    *,
    multiword: Literal["words", "surface"] = "words",
    missing: str | None = None,
    label_names: Sequence[str] | None = None,
) -> TokenLabelledDataset:
    """Read a CoNLL-U file into a :class:`TokenLabelledDataset` labelled by ``column``.

    missing: the label of a word whose column is ``_`` (or lacks the FEATS/MISC key); None leaves the word
        unlabelled (its tokens get -100).
    label_names: the class order; default, the labels seen, sorted.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No CoNLL-U file at {path}.")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give read_conllu one .conllu file.")
    text = _decode(path.read_bytes(), path.name)
    return parse_conllu(
        text, column, multiword=multiword, missing=missing, label_names=label_names, source=path.name
    )


def parse_conllu(
    text: str,
    column: Column = "upos",
    *,
    multiword: Literal["words", "surface"] = "words",
    missing: str | None = None,
    label_names: Sequence[str] | None = None,
    source: str = "<string>",
) -> TokenLabelledDataset:
    """Like :func:`read_conllu`, from the file's text; ``source`` names it in error messages."""
    if multiword not in ("words", "surface"):
        raise ValueError(f"multiword must be 'words' or 'surface', not {multiword!r}.")
    getter = _column_getter(column)
    text = text.removeprefix("\ufeff")  # a byte-order mark: harmless, dropped
    sentences = []
    for block in _blocks(text, source):
        sentences.append(_sentence(block, getter, multiword, missing, source))
    if not sentences:
        raise ConlluError(source, 1, "the file holds no sentence (no token lines).")
    if not any(label is not None for s in sentences for label in s.labels):
        raise ValueError(
            f"{source}: column {_column_name(column)!r} is empty ('_') for every word; choose another column "
            "or pass missing='...' to give such words a label."
        )
    dataset = TokenLabelledDataset.from_sentences(
        sentences, label_names, name=f"{source} {_column_name(column)}"
    )
    return dataset


def _decode(data: bytes, source: str) -> str:
    """The file's text: UTF-8, with or without a byte-order mark (accepted and dropped)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ConlluError(
            source,
            line,
            f"the file is not UTF-8 (byte 0x{data[error.start]:02X} at column {column}); CoNLL-U files are "
            "UTF-8: convert it first, e.g. iconv -f latin1 -t utf-8 (if it is Latin-1).",
        ) from None


def _column_name(column: Column) -> str:
    return column if isinstance(column, str) else getattr(column, "__name__", "custom")


def _column_getter(column: Column) -> Callable[[Any], Any]:
    if callable(column):
        return column
    if not isinstance(column, str):
        raise TypeError(
            f"column must be a column name or a function of the token, not {type(column).__name__}."
        )
    name, _, key = column.partition(":")
    name = name.lower()
    if name not in COLUMNS or name == "id":
        raise ValueError(
            f"Unknown CoNLL-U column {column!r}: use one of {', '.join(c for c in COLUMNS if c != 'id')}, "
            "'feats:KEY' / 'misc:KEY' for one feature, or a function of the token."
        )
    if key and name not in ("feats", "misc"):
        raise ValueError(f"Column {column!r}: only feats and misc have keys (e.g. 'feats:Number').")
    if key:
        return lambda token: (token[name] or {}).get(key)
    if name in ("feats", "misc", "deps"):
        # The column as written (e.g. "Case=Nom|Number=Sing"), not the parsed dictionary.
        return lambda token: token["_raw"][COLUMNS.index(name)]
    return lambda token: token[name]


def _label(line: _Line, getter: Callable[[Any], Any], missing: str | None, source: str) -> str | None:
    try:
        value = getter(line.token)
    except Exception as error:  # the user's column function: say where it failed
        raise ConlluError(
            source,
            line.number,
            f"the column function {getattr(getter, '__name__', 'column')!r} raised "
            f"{type(error).__name__}: {error} (on the token {line.token['form']!r}).",
        ) from error
    if value is None or value == "_" or value == "":
        return missing
    return str(value)


def _space_after(token: Any) -> bool:
    misc = token["misc"] or {}
    return misc.get("SpaceAfter") != "No"


def _sentence(block: _Block, getter, multiword: str, missing: str | None, source: str) -> LabelledSentence:
    where = f"{source}:{block.start}" + (
        f" sent_id={block.metadata['sent_id']}" if "sent_id" in block.metadata else ""
    )
    words, labels, spaces = [], [], []
    i = 0
    while i < len(block.words):
        word = block.words[i].token
        first = i + 1
        span = block.ranges.get(first)
        if span is None:
            words.append(word["form"])
            labels.append(_label(block.words[i], getter, missing, source))
            spaces.append(_space_after(word))
            i += 1
            continue
        last = span.token["id"][2]
        inner_lines = block.words[first - 1 : last]
        inner = [line.token for line in inner_lines]
        if multiword == "surface":
            inner_labels = [_label(line, getter, missing, source) for line in inner_lines]
            words.append(span.token["form"])
            labels.append(
                None if all(x is None for x in inner_labels) else "+".join(x or "_" for x in inner_labels)
            )
            spaces.append(_space_after(span.token))
        else:
            for j, (line, t) in enumerate(zip(inner_lines, inner)):
                words.append(t["form"])
                labels.append(_label(line, getter, missing, source))
                spaces.append(True if j + 1 < len(inner) else _space_after(span.token))
        i = last
    return LabelledSentence(tuple(words), tuple(labels), tuple(spaces), source=where)


def _blocks(text: str, source: str) -> Iterator[_Block]:
    lines = text.splitlines()
    block: _Block | None = None
    expected = 1  # the next word id
    range_end = 0  # last word id of the open multiword token (0: none open)
    last_empty = (0, 0)
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            if block is not None:
                yield _close(block, source, range_end, expected)
            block, expected, range_end, last_empty = None, 1, 0, (0, 0)
            continue
        if block is None:
            block = _Block(number, [], [], {}, {})
        if line.startswith("#"):
            if block.words:
                raise ConlluError(
                    source, number, "a comment line inside a sentence; comments must precede its tokens."
                )
            block.comments.append(_Line(number, line))
            key, eq, value = line[1:].partition("=")
            if eq:
                block.metadata[key.strip()] = value.strip()
            continue
        fields = line.split("\t")
        if len(fields) != 10:
            raise ConlluError(
                source,
                number,
                f"expected 10 tab-separated columns (ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS MISC), "
                f"found {len(fields)}"
                + (" (are the columns separated by spaces?)" if len(fields) < 10 else "")
                + ".",
            )
        ident, form = fields[0], fields[1]
        if form == "":
            raise ConlluError(source, number, "the FORM column is empty (write '_' for an unknown form).")
        if not (_WORD.match(ident) or _RANGE.match(ident) or _EMPTY.match(ident)):
            raise ConlluError(
                source,
                number,
                f"{ident!r} is not a CoNLL-U ID: expected a word (7), "
                "a multiword range (3-4) or an empty node (8.1).",
            )
        try:
            token = parse_line(line, DEFAULT_FIELDS)
        except ParseException as error:
            raise ConlluError(source, number, str(error)) from None
        token["_raw"] = fields
        if _WORD.match(ident):
            if int(ident) != expected:
                raise ConlluError(
                    source,
                    number,
                    f"word ID {ident} where {expected} was due; word IDs run 1, 2, 3, ... in a sentence.",
                )
            block.words.append(_Line(number, line, token))
            expected += 1
            if range_end and expected > range_end:
                range_end = 0
            last_empty = (expected - 1, 0)
        elif match := _RANGE.match(ident):
            a, b = int(match.group(1)), int(match.group(2))
            if a != expected:
                raise ConlluError(
                    source,
                    number,
                    f"multiword token {ident} must start at the next word, {expected}, and precede it.",
                )
            if b <= a:
                raise ConlluError(
                    source, number, f"multiword token range {ident} must cover at least two words (a-b, a<b)."
                )
            if range_end:
                raise ConlluError(
                    source,
                    number,
                    f"multiword token {ident} overlaps the one still open up to word {range_end}.",
                )
            range_end = b
            block.ranges[a] = _Line(number, line, token)
        else:
            match = _EMPTY.match(ident)
            head, sub = int(match.group(1)), int(match.group(2))
            if head != expected - 1:
                raise ConlluError(
                    source,
                    number,
                    f"empty node {ident} must follow word {head}; it comes after word {expected - 1}.",
                )
            if sub != (last_empty[1] + 1 if last_empty[0] == head else 1):
                raise ConlluError(
                    source,
                    number,
                    f"empty node {ident} out of order: after word {head} they run {head}.1, {head}.2, ...",
                )
            last_empty = (head, sub)
    if block is not None:
        yield _close(block, source, range_end, expected)


def _close(block: _Block, source: str, range_end: int, expected: int) -> _Block:
    if not block.words:
        raise ConlluError(source, block.start, "a sentence with comments but no word lines.")
    if range_end:
        line = block.ranges[max(block.ranges)]
        raise ConlluError(
            source,
            line.number,
            f"multiword token {line.text.split(chr(9))[0]} reaches "
            f"past the sentence's last word, {expected - 1}.",
        )
    return block
