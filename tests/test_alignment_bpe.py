"""Word-to-token alignment on real text: hand-written UD fixtures tokenized by the 131k byte-level BPE.

Each count of dropped words below was made by hand from the tokens (written out in the comments, ``␣`` a
space, ``*`` where a word's first token is): a word is dropped when a token that starts in the word before it
covers its first character.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from workbench.data.alignment import IGNORE, AlignmentWarning, LabelledSentence, TokenLabelledDataset
from workbench.data.conllu import read_conllu

FIXTURES = Path(__file__).parent / "fixtures"


def encode_quietly(data, tokenizer, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlignmentWarning)
        return data.encode(tokenizer, **options)


# English, 5 sentences, 34 words:
#   He left (for good).        He* ␣left* ␣(* for* ␣good* ).       -> "." dropped (PUNCT)
#   She said "no."             She* ␣said* ␣"* no* ."              -> closing '"' dropped (PUNCT)
#   It was a five-year plan!!  It* ␣was* ␣a* ␣five* -year ␣plan* !!*  -> "year" dropped (NOUN)
#   Sue likes coffee and Bill tea.   (empty node 5.1 is not in the text)  -> none
#   Wow!! That 's great.       Wow* !!* ␣That* ␣'* s ␣great* .*   -> none
# French (multiword words: du = de le, au = à le), 3 sentences, 25 words:
#   L'hôpital est fermé.               L* 'hôpital ␣est* ␣fermé* .*   -> "hôpital" (NOUN)
#   C'est l'« affaire » de le siècle.  C* 'est ␣l* '« ␣affaire* ...  -> "est" (AUX), "«" (PUNCT)
#   Il va à le marché, c'est sûr.      ... ␣c* 'est ␣sûr* .*           -> "est" (AUX)
# Italian (dell' = di l', nell' = in l', al = a il), 2 sentences, 17 words:
#   L'uomo è andato a il mercato.  L* 'uomo ...                       -> "uomo" (NOUN)
#   C'è di l'acqua in l'anfora.    C* 'è ␣di* ␣l* 'acqua ␣in* ␣l* 'an for a .*
#                                                   -> "è" (VERB), "acqua", "anfora" (NOUN)
# German (im = in dem), 3 sentences, 22 words:
#   „Ja“, sagte er.   „* Ja* “,* ␣sagte* ␣er* .*                     -> "," (PUNCT)
# Japanese (no spaces), 3 sentences, 19 words:
#   東京に行きました。      東京* に* 行* き ました* 。*             -> "た" (AUX)
#   猫が好きです。          <0xE7><0x8C>* <0xAB> が* 好き* です* 。*  -> none (猫's bytes span 2 tokens)
#   今日は雨が降っている。  今日は* 雨* が* 降* っている 。*
#                                              -> "は" (ADP), "て" (SCONJ), "いる" (AUX)
HAND_COUNTS = {
    "en_punctuation": (34, {"PUNCT": 2, "NOUN": 1}),
    "fr_elisions": (25, {"NOUN": 1, "AUX": 2, "PUNCT": 1}),
    "it_elisions": (17, {"NOUN": 3, "VERB": 1}),
    "de_quotes": (22, {"PUNCT": 1}),
    "ja_nospace": (19, {"AUX": 2, "ADP": 1, "SCONJ": 1}),
}


@pytest.mark.parametrize("name", sorted(HAND_COUNTS))
def test_dropped_words_match_the_hand_count(tekken, name):
    data = read_conllu(FIXTURES / f"{name}.conllu", "upos")
    with pytest.warns(AlignmentWarning, match="have no token of their own"):
        encoded = data.encode(tekken)
    words, dropped = HAND_COUNTS[name]
    report = encoded.report
    assert report.n_words == words == sum(len(s) for s in data.sentences)
    assert report.dropped[report.dropped > 0].to_dict() == dropped
    assert report.n_unknown == 0  # a byte-level BPE has no unknown token
    assert len(encoded) == len(data) and not report.skipped
    # Every word that is not dropped is labelled exactly once, on its first token.
    assert encoded.n_labelled == words - sum(dropped.values())
    for row, labels in zip(encoded.word_ids, encoded.labels):
        labelled = [w for w, label in zip(row, labels) if label != IGNORE]
        assert len(labelled) == len(set(labelled))


def test_dropped_words_get_no_label_and_the_others_keep_theirs(tekken):
    data = read_conllu(FIXTURES / "fr_elisions.conllu", "upos")
    encoded = encode_quietly(data, tekken)
    frame = encoded.tokens_frame(0, tekken)  # L'hôpital est fermé.
    assert frame["token"].tolist() == ["<s>", "L", "'hôpital", "␣est", "␣fermé", "."]
    assert frame["word"].fillna("-").tolist() == ["-", "L'", "L'", "est", "fermé", "."]
    assert frame["label"].fillna("-").tolist() == ["-", "DET", "-", "AUX", "ADJ", "PUNCT"]
    # "every" labels the word's other tokens too, never those of the dropped "hôpital".
    every = encode_quietly(data, tekken, subtokens="every")
    names = [data.label_names[i] if i != IGNORE else None for i in every.labels[0]]
    assert names == [None, "DET", "DET", "AUX", "ADJ", "PUNCT"]


@pytest.mark.parametrize("name", sorted(HAND_COUNTS))
def test_word_boundaries_keep_every_label_and_the_characters(tekken, name):
    data = read_conllu(FIXTURES / f"{name}.conllu", "upos")
    with warnings.catch_warnings():
        warnings.simplefilter("error", AlignmentWarning)  # nothing to report
        encoded = data.encode(tekken, tokenize="words")
    assert encoded.report.n_dropped == 0
    assert encoded.n_labelled == sum(len(s) for s in data.sentences)
    for i, sentence in enumerate(data.sentences):
        # The model reads the same characters, only split where the words split.
        assert tekken.decode(encoded.input_ids[i], skip_special_tokens=True) == sentence.text
        firsts = [w for w, label in zip(encoded.word_ids[i], encoded.labels[i]) if label != IGNORE]
        assert firsts == list(range(len(sentence)))


def test_surface_multiword_tokens_align_too(tekken):
    # "du", "au", "dell'", "nell'" as written: the Italian elisions still drop "acqua" and "anfora".
    data = read_conllu(FIXTURES / "it_elisions.conllu", "upos", multiword="surface")
    encoded = encode_quietly(data, tekken)
    assert encoded.report.n_dropped == 4  # uomo, è, acqua, anfora
    assert "ADP+DET" in encoded.report.words.index


def test_warning_threshold_and_message(tekken):
    data = read_conllu(FIXTURES / "en_punctuation.conllu", "upos")
    # 3 of 34 words (8.8%) are dropped: above 5% warns, 10% does not.
    with pytest.warns(AlignmentWarning, match=r"3 of 34 labelled words \(8.8%\).*PUNCT 2, NOUN 1"):
        data.encode(tekken, warn_above=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AlignmentWarning)
        data.encode(tekken, warn_above=0.10)
    with pytest.raises(ValueError, match="warn_above is a share"):
        data.encode(tekken, warn_above=5)


def test_report_table(tekken):
    encoded = encode_quietly(read_conllu(FIXTURES / "ja_nospace.conllu", "upos"), tekken)
    table = encoded.report.table
    assert table.loc["AUX", "words"] == 4 and table.loc["AUX", "dropped"] == 2
    assert table.loc["AUX", "dropped_share"] == pytest.approx(0.5)  # まし です kept; た いる dropped
    assert table["unknown"].sum() == 0


def test_unknown_words_are_counted_by_label():
    from workbench.checkpoint.tokenizer import build_tokenizer

    # The shipped word-level tokenizer knows "the", "dog", "." and not "zorblax" or "quuxed".
    sentence = LabelledSentence(
        ("The", "zorblax", "quuxed", "the", "dog", "."),
        ("DET", "NOUN", "VERB", "DET", "NOUN", "PUNCT"),
        (True, True, True, True, False, False),
    )
    data = TokenLabelledDataset.from_sentences([sentence])
    with pytest.warns(AlignmentWarning, match=r"2 of 6 labelled words \(33.3%\) became the unknown token"):
        encoded = data.encode(build_tokenizer())
    assert encoded.report.unknown.to_dict() == {"DET": 0, "NOUN": 1, "PUNCT": 0, "VERB": 1}
    assert encoded.n_labelled == 6  # unknown words keep their label; the report says what they are


def test_a_sentence_that_cannot_be_encoded_is_skipped_and_named(tekken):
    short = LabelledSentence(("Hi", "."), ("INTJ", "PUNCT"), (False, False), source="a.conllu:1")
    long = LabelledSentence(tuple("abcdefgh"), ("X",) * 8, (True,) * 8, source="a.conllu:9 sent_id=2")
    data = TokenLabelledDataset.from_sentences([short, long, short])
    with pytest.warns(AlignmentWarning, match=r"Skipped 1 sentences .*a.conllu:9 sent_id=2.*max_length=6"):
        encoded = data.encode(tekken, max_length=6)
    assert len(encoded) == 2 and encoded.report.skipped[0][0] == "a.conllu:9 sent_id=2"
    assert [s.source for s in encoded.dataset.sentences] == ["a.conllu:1", "a.conllu:1"]
    with pytest.raises(Exception, match="No sentence .* could be encoded"):
        TokenLabelledDataset.from_sentences([long]).encode(tekken, max_length=6)
