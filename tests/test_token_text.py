"""Display text of tokens: byte-level pieces decoded, spaces visible, split characters and control
characters shown, labels escaped for plotly; whole-word tokens for induction sequences."""

from __future__ import annotations

import pytest
import torch

from workbench.checkpoint.tokenizer import build_tokenizer
from workbench.data.corpus import repeated_token_ids
from workbench.token_text import (
    SPACE,
    display_token,
    display_tokens,
    escape_label,
    is_word_token,
    word_token_ids,
)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_byte_level_pieces_are_decoded_with_the_space_visible(tekken):
    ids = ids_of(tekken, "Hello Zürich l'hôpital")
    assert tekken.convert_ids_to_tokens(ids)[1] == "ĠZÃ¼rich"  # what the vocabulary holds
    assert display_tokens(tekken, ids) == ["Hello", "␣Zürich", "␣l", "'hôpital"]
    assert display_tokens(tekken, ids, space="·")[1] == "·Zürich"


def test_a_split_character_shows_its_bytes_or_merges(tekken):
    ids = ids_of(tekken, "a😀")  # the emoji's four UTF-8 bytes F0 9F 98 80 come in several tokens
    assert len(ids) > 2
    shown = display_tokens(tekken, ids)
    assert "".join(shown[1:]) == "<0xF0><0x9F><0x98><0x80>"
    assert all(piece.startswith("<0x") for piece in shown[1:])
    merged = display_tokens(tekken, ids, partial="merge")
    assert merged[1] == "😀…" and all(piece.startswith("…<0x") for piece in merged[2:])
    # A token that completes its own characters is unaffected.
    assert display_tokens(tekken, ids_of(tekken, "日本"), partial="merge") == ["日本"]


def test_control_and_invisible_characters_are_escaped(tekken):
    shown = display_tokens(tekken, ids_of(tekken, "a\tb\nc\u200bd\u00a0e"))
    joined = "".join(shown)
    assert "\\t" in joined and "\\n" in joined and "\\u200b" in joined and "\\xa0" in joined
    assert not any(ch in joined for ch in "\t\n\u200b\u00a0")
    assert display_tokens(tekken, [1000, 1007]) == ["\\x00", "\\x07"]  # the byte tokens 0x00 and 0x07


def test_special_tokens_are_shown_as_written(tekken):
    assert display_tokens(tekken, [0, 1, 2, 3, 11]) == ["<unk>", "<s>", "</s>", "[INST]", "<pad>"]


def test_metaspace_tokenizer_and_tensors():
    tok = build_tokenizer()
    ids = torch.tensor(tok("When Mary went to the store, zzz").input_ids)
    assert display_tokens(tok, ids) == [
        "<s>",
        "␣When",
        "␣Mary",
        "␣went",
        "␣to",
        "␣the",
        "␣store",
        ",",
        "<unk>",
    ]
    assert display_token(tok, tok.convert_tokens_to_ids("▁Mary")) == SPACE + "Mary"


def test_bad_ids_are_refused(tekken):
    with pytest.raises(ValueError, match=r"not in this tokenizer's vocabulary \(integers 0..131071\)"):
        display_tokens(tekken, [131072])
    with pytest.raises(ValueError, match="one sequence"):
        display_tokens(tekken, [[1, 2]])
    with pytest.raises(TypeError, match="display_token"):
        display_tokens(tekken, 5)
    with pytest.raises(ValueError, match="partial must be"):
        display_tokens(tekken, [1], partial="glue")


def test_labels_are_escaped_for_plotly():
    assert escape_label("0:<s>") == "0:&lt;s&gt;"
    assert escape_label("a & b") == "a &amp; b"
    assert escape_label("␣Zürich") == "␣Zürich"


def test_word_tokens_are_whole_printable_words(tekken):
    pool = word_token_ids(tekken)
    assert 50_000 < len(pool) < len(tekken)
    sample = pool[:: len(pool) // 500]
    for text in display_tokens(tekken, sample):
        assert text.startswith(SPACE) and text[1:].isalpha(), text
    assert not set(pool) & set(range(1256))  # no control tokens, no raw bytes (1000 + 256)
    assert is_word_token(tekken, ids_of(tekken, " Zürich")[0])
    assert not is_word_token(tekken, ids_of(tekken, "😀")[0])  # a partial character
    assert not is_word_token(tekken, ids_of(tekken, "hello")[0])  # no leading space: not a word's start


def test_repeated_token_ids_draw_only_word_tokens(tekken):
    ids = repeated_token_ids(tekken, 4, 30, 7)
    assert ids.shape == (4, 61) and ids[:, 0].eq(tekken.bos_token_id).all()
    assert set(ids[:, 1:].flatten().tolist()) <= set(word_token_ids(tekken))


def test_the_shipped_tokenizer_keeps_its_induction_pool():
    # The model card's induction figures were measured on sequences drawn from this pool: it must not move.
    tok = build_tokenizer()
    special = set(tok.all_special_ids)
    old_rule = sorted(i for t, i in tok.get_vocab().items() if i not in special and t.lstrip("▁").isalpha())
    assert word_token_ids(tok) == old_rule


def test_the_vocabulary_labels_are_computed_once_per_tokenizer(random_model, monkeypatch):
    import copy

    labels = random_model.vocabulary_labels()
    assert labels == random_model.token_labels(range(random_model.cfg.d_vocab))
    assert random_model.vocabulary_labels() is labels  # cached: 131k tokens take seconds
    original = random_model.tokenizer
    other = copy.deepcopy(original)
    monkeypatch.setattr(random_model, "tokenizer", other)
    fresh = random_model.vocabulary_labels()
    assert fresh is not labels and fresh == labels  # another tokenizer object: computed again
