"""Tokens as people can read them: the one place that turns token ids into display text.

:func:`display_tokens` works for every fast tokenizer the workbench meets: byte-level BPE (GPT-2 style, as
Apertus's own and Mistral's "tekken"; ``ĠZÃ¼rich`` is shown ``␣Zürich``), Metaspace/SentencePiece
(``▁Mary`` is ``␣Mary``, byte-fallback pieces such as ``<0xF0>`` are bytes) and word-level ones.

* Spaces are shown as :data:`SPACE` (``␣``), so a leading space is visible on an axis.
* Control and invisible characters are escaped: ``\\n``, ``\\t``, ``\\r``, ``\\x07``, ``\\u200b`` (a
  no-break space is ``\\xa0``).
* A token that holds only part of a character's UTF-8 bytes (a byte-level BPE splits most emoji and many
  CJK characters) shows those bytes as ``<0xF0>``: exact, and every token stays distinguishable. With
  ``partial="merge"`` the character is shown on the token where it starts, followed by ``…``, and the
  tokens that complete it show ``…`` and their own bytes: ``["␣😀…", "…<0x98>", "…<0x80>"]``.
* Special tokens (``<s>``, ``<pad>``, ``[INST]``...) are shown as written.

The result is plain text. Labels for plotly (whose text understands a little HTML, so ``<s>`` would vanish)
go through :func:`escape_label`; pandas escapes its own HTML.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, Literal

__all__ = [
    "SPACE",
    "display_token",
    "display_tokens",
    "escape_label",
    "escape_labels",
    "is_word_token",
    "token_bytes",
    "word_token_ids",
]

#: How a space is shown.
SPACE = "␣"

Partial = Literal["hex", "merge"]

_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
# Characters that print as nothing or move the cursor: escaped rather than shown.
_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def display_tokens(
    tokenizer: Any, ids: Iterable[int] | Any, *, space: str = SPACE, partial: Partial = "hex"
) -> list[str]:
    """The display text of each token in ``ids`` (a list, or a 1-D tensor or array), in order.

    partial: ``"hex"`` shows the bytes of a split character as ``<0xF0>`` in each token; ``"merge"``
    shows the character on its first token (see the module's docstring).
    """
    if partial not in ("hex", "merge"):
        raise ValueError(f"partial must be 'hex' or 'merge', not {partial!r}.")
    ids = _id_list(ids, tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    added = _added_tokens(tokenizer)
    byte_level = _is_byte_level(tokenizer)
    out: list[str | None] = [None] * len(ids)
    run: list[tuple[int, bytes]] = []  # consecutive ordinary tokens: (position, bytes)
    for position, (token_id, piece) in enumerate(zip(ids, pieces)):
        if token_id in added:
            special, content = added[token_id]
            out[position] = content if special else _show_text(content, space)
            _render_run(run, out, space, partial)
            run = []
        else:
            run.append((position, _piece_bytes(piece, byte_level)))
    _render_run(run, out, space, partial)
    return [text if text is not None else "" for text in out]


def display_token(tokenizer: Any, token_id: int, *, space: str = SPACE) -> str:
    """The display text of one token on its own (partial characters as ``<0xF0>``)."""
    return display_tokens(tokenizer, [token_id], space=space)[0]


def token_bytes(tokenizer: Any, ids: Iterable[int] | Any) -> list[bytes]:
    """The bytes of text each token stands for (a special token: its written form, e.g. ``b"<s>"``)."""
    ids = _id_list(ids, tokenizer)
    added = _added_tokens(tokenizer)
    byte_level = _is_byte_level(tokenizer)
    return [
        added[i][1].encode("utf-8") if i in added else _piece_bytes(piece, byte_level)
        for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids))
    ]


def escape_label(text: str) -> str:
    """``text`` made safe for a plotly label, title or hover text (and HTML): ``<s>`` shows as ``<s>``
    instead of vanishing as a tag, ``&`` as ``&``."""
    return html.escape(str(text), quote=False)


def escape_labels(texts: Iterable[str]) -> list[str]:
    """:func:`escape_label` of each text."""
    return [escape_label(text) for text in texts]


def is_word_token(tokenizer: Any, token_id: int) -> bool:
    """Whether a token is a whole word: letters only, after one leading space (the start of a word in
    running text), printable; no special or control token, no partial UTF-8 character. A tokenizer without
    space-led tokens (none of its tokens starts with a space) has its letter-only tokens count."""
    return token_id in set(word_token_ids(tokenizer, [token_id]))


def word_token_ids(tokenizer: Any, ids: Iterable[int] | None = None) -> list[int]:
    """The ids (sorted) of the whole-word tokens (see :func:`is_word_token`) among ``ids`` (default: the
    whole vocabulary)."""
    added = _added_tokens(tokenizer)
    byte_level = _is_byte_level(tokenizer)
    vocab = tokenizer.get_vocab()
    spaced = any(_piece_bytes(piece, byte_level).startswith(b" ") for piece in vocab)
    if ids is not None:
        wanted = set(ids)
        vocab = {piece: i for piece, i in vocab.items() if i in wanted}
    out = []
    for piece, token_id in vocab.items():
        if token_id in added:
            continue
        try:
            text = _piece_bytes(piece, byte_level).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if spaced and not text.startswith(" "):
            continue
        word = text[1:] if spaced else text
        if word.isalpha() and word.isprintable():
            out.append(token_id)
    return sorted(out)


# ----------------------------------------------------------------------------------------------------------


def _id_list(ids: Any, tokenizer: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        raise TypeError("display_tokens takes a sequence of token ids; for one id use display_token.")
    ids = list(ids)
    if any(isinstance(i, list) for i in ids):
        raise ValueError("display_tokens takes one sequence of token ids (1-D); pass one row at a time.")
    size = len(tokenizer)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size:
            raise ValueError(
                f"Token id {i!r} is not in this tokenizer's vocabulary (integers 0..{size - 1})."
            )
    return ids


def _added_tokens(tokenizer: Any) -> dict[int, tuple[bool, str]]:
    """Tokens outside the model's byte or piece vocabulary: id -> (special, content)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    return {i: (bool(getattr(t, "special", False)) or i in specials, str(t)) for i, t in decoder.items()}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in repr(backend.decoder)


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character that stands for each byte."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _piece_bytes(piece: str, byte_level: bool) -> bytes:
    if byte_level:
        table = _unicode_to_byte()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return piece.encode("utf-8")
    match = _BYTE_PIECE.match(piece)
    if match:  # SentencePiece byte fallback
        return bytes([int(match.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")


def _utf8_length(lead: int) -> int:
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0  # a continuation byte or an invalid lead


def _characters(data: bytes) -> list[tuple[int, int, str | None]]:
    """UTF-8 ``data`` as ``(start, end, char)``; a byte that starts no complete character is
    ``(i, i + 1, None)``."""
    out, i = [], 0
    while i < len(data):
        size = _utf8_length(data[i])
        if size:
            try:
                out.append((i, i + size, data[i : i + size].decode("utf-8")))
                i += size
                continue
            except UnicodeDecodeError:
                pass
        out.append((i, i + 1, None))
        i += 1
    return out


def _show_char(ch: str, space: str) -> str:
    if ch == " ":
        return space
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    if unicodedata.category(ch) in _INVISIBLE:
        return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"
    return ch


def _show_text(text: str, space: str) -> str:
    return "".join(_show_char(ch, space) for ch in text)


def _render_run(run: Sequence[tuple[int, bytes]], out: list, space: str, partial: Partial) -> None:
    """Fill ``out`` for consecutive ordinary tokens, whose bytes may share characters."""
    if not run:
        return
    if partial == "hex":
        for position, data in run:
            out[position] = "".join(
                _show_char(ch, space) if ch is not None else f"<0x{data[a]:02X}>"
                for a, _, ch in _characters(data)
            )
        return
    joined = b"".join(data for _, data in run)
    owner, bounds, at = [], [], 0  # owner[i]: the run index of the token holding byte i
    for k, (_, data) in enumerate(run):
        owner += [k] * len(data)
        bounds.append(at)
        at += len(data)
    texts = [""] * len(run)
    for a, b, ch in _characters(joined):
        first, last = owner[a], owner[b - 1]
        if ch is None:
            texts[first] += f"<0x{joined[a]:02X}>"
        elif first == last:
            texts[first] += _show_char(ch, space)
        else:  # the character starts in one token and ends in a later one
            texts[first] += _show_char(ch, space) + "…"
            for k in range(first + 1, last + 1):
                lo, hi = max(a, bounds[k]), min(b, bounds[k] + len(run[k][1]))
                texts[k] += "…" + "".join(f"<0x{byte:02X}>" for byte in joined[lo:hi])
    for (position, _), text in zip(run, texts):
        out[position] = text
