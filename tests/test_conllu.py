"""CoNLL-U reading and word-to-token alignment: UD's multiword tokens and empty nodes, line-numbered
errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from workbench.checkpoint.tokenizer import build_tokenizer
from workbench.data.alignment import (
    IGNORE,
    AlignmentWarning,
    LabelledSentence,
    TokenLabelledDataset,
)
from workbench.data.conllu import ConlluError, parse_conllu, read_conllu

FIXTURE = Path(__file__).parent / "fixtures" / "multiword.conllu"
SAMPLE = Path(__file__).parent.parent / "workbench" / "data" / "sample.conllu"

# Written from the UD definition, not from the reader: syntactic words 3 (do) and 4 (n't) carry the annotation
# of the multiword token "don't"; the empty node 8.1 (the elided "like") is not part of the sentence.
WORDS_1 = ("I", "really", "do", "n't", "like", "cats", "and", "Bob", "dogs", ".")
UPOS_1 = ("PRON", "ADV", "AUX", "PART", "VERB", "NOUN", "CCONJ", "PROPN", "NOUN", "PUNCT")
WORDS_2 = ("The", "dog", "did", "n't", "bark", ".")
UPOS_2 = ("DET", "NOUN", "AUX", "PART", "VERB", "PUNCT")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (so every word of two letters or more splits), <s> prepended."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,'"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def test_fixture_words_and_labels_follow_ud():
    data = read_conllu(FIXTURE, "upos")
    assert [s.words for s in data.sentences] == [WORDS_1, WORDS_2]
    assert [s.labels for s in data.sentences] == [UPOS_1, UPOS_2]
    assert data.sentences[0].text == "I really do n't like cats and Bob dogs."
    assert data.label_names == tuple(sorted(set(UPOS_1 + UPOS_2)))


def test_surface_mode_rebuilds_the_text_and_joins_multiword_labels():
    data = read_conllu(FIXTURE, "upos", multiword="surface")
    first = data.sentences[0]
    assert first.words == ("I", "really", "don't", "like", "cats", "and", "Bob", "dogs", ".")
    assert first.labels == ("PRON", "ADV", "AUX+PART", "VERB", "NOUN", "CCONJ", "PROPN", "NOUN", "PUNCT")
    # SpaceAfter=No is honoured: the surface text is the sentence's "# text" comment.
    assert first.text == "I really don't like cats and Bob dogs."
    assert data.sentences[1].text == "The dog didn't bark."


def test_other_columns_and_feature_keys():
    assert read_conllu(FIXTURE, "deprel").sentences[1].labels == (
        "det",
        "nsubj",
        "aux",
        "advmod",
        "root",
        "punct",
    )
    assert read_conllu(FIXTURE, "xpos").sentences[1].labels == ("DT", "NN", "VBD", "RB", "VB", ".")
    number = read_conllu(FIXTURE, "feats:Number")
    assert number.sentences[0].labels == (
        "Sing",
        None,
        "Sing",
        None,
        None,
        "Plur",
        None,
        "Sing",
        "Plur",
        None,
    )
    assert number.label_names == ("Plur", "Sing")
    filled = read_conllu(FIXTURE, "feats:Number", missing="none")
    assert filled.sentences[1].labels == ("none", "Sing", "none", "none", "none", "none")
    lemma = read_conllu(FIXTURE, lambda token: token["lemma"].lower())
    assert lemma.sentences[1].labels == ("the", "dog", "do", "not", "bark", ".")
    with pytest.raises(ValueError, match="Unknown CoNLL-U column"):
        read_conllu(FIXTURE, "postag")


def test_fixture_aligns_to_expected_token_labels():
    tok = build_tokenizer()  # word-level: "n't" becomes "n", "'", "t" (punctuation is split off)
    data = read_conllu(FIXTURE, "upos")
    names = data.label_names
    # The shipped vocabulary does not know 9 of the 16 words: really do n't like cats dogs / did n't bark.
    with pytest.warns(AlignmentWarning, match="9 of 16 labelled words"):
        first = data.encode(tok, subtokens="first")
    with pytest.warns(AlignmentWarning, match="9 of 16 labelled words"):
        every = data.encode(tok, subtokens="every")
    # Position 0 is <s>; "n't" is word 3 and takes positions 4, 5, 6.
    expected_words = [-1, 0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9]
    assert first.word_ids[0] == expected_words
    by_name = [names[i] if i != IGNORE else None for i in first.labels[0]]
    assert by_name == [
        None,
        "PRON",
        "ADV",
        "AUX",
        "PART",
        None,
        None,
        "VERB",
        "NOUN",
        "CCONJ",
        "PROPN",
        "NOUN",
        "PUNCT",
    ]
    by_name = [names[i] if i != IGNORE else None for i in every.labels[0]]
    assert by_name == [
        None,
        "PRON",
        "ADV",
        "AUX",
        "PART",
        "PART",
        "PART",
        "VERB",
        "NOUN",
        "CCONJ",
        "PROPN",
        "NOUN",
        "PUNCT",
    ]
    # Every sub-token of a word shares its word type (the control task's unit); unlabelled tokens have none.
    assert every.types[0][4] == every.types[0][5] == every.types[0][6] != -1
    assert first.types[0][5] == first.types[0][0] == -1


def test_split_words_label_first_or_every_subtoken():
    tok = char_tokenizer()
    sentence = LabelledSentence(("Bob", "ran", "."), ("PROPN", "VERB", "PUNCT"), (True, False, False))
    data = TokenLabelledDataset.from_sentences([sentence])
    first = data.encode(tok, subtokens="first")
    every = data.encode(tok, subtokens="every")
    ids = {name: i for i, name in enumerate(data.label_names)}
    assert len(first.input_ids[0]) == 1 + 3 + 3 + 1
    assert first.labels[0] == [
        IGNORE,
        ids["PROPN"],
        IGNORE,
        IGNORE,
        ids["VERB"],
        IGNORE,
        IGNORE,
        ids["PUNCT"],
    ]
    assert every.labels[0] == [IGNORE] + [ids["PROPN"]] * 3 + [ids["VERB"]] * 3 + [ids["PUNCT"]]


def test_special_tokens_and_padding_are_never_labelled():
    tok = char_tokenizer()
    short = LabelledSentence(("a",), ("X",), (False,))
    long = LabelledSentence(("abc", "de"), ("X", "Y"), (True, False))
    encoded = TokenLabelledDataset.from_sentences([short, long]).encode(tok, subtokens="every")
    batch = encoded.batch([0, 1])
    assert batch["input_ids"].shape == (2, 6)  # <s> a b c d e
    assert (batch["labels"][:, 0] == IGNORE).all()  # <s>
    assert (batch["labels"][0, 2:] == IGNORE).all() and (batch["attention_mask"][0, 2:] == 0).all()
    assert batch["labels"][0, 1] != IGNORE and (batch["labels"][1, 1:] != IGNORE).all()


def test_a_token_across_two_words_belongs_to_the_first_and_drops_the_second():
    vocab = {"<unk>": 0, "<s>": 1, "don't": 2, "stop": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")
    glued = LabelledSentence(
        ("do", "n't", "stop"), ("AUX", "PART", "VERB"), (False, True, False), source="glued"
    )
    data = TokenLabelledDataset.from_sentences([glued])
    with pytest.warns(AlignmentWarning, match=r"1 of 3 labelled words .* not labelled \(PART 1\)"):
        encoded = data.encode(fast)
    names = [data.label_names[i] if i != IGNORE else None for i in encoded.labels[0]]
    assert names == [None, "AUX", "VERB"]  # "don't" is labelled as "do", where it starts; "n't" is not
    assert encoded.word_ids[0] == [-1, 0, 2]
    assert encoded.report.dropped["PART"] == 1 and encoded.report.n_dropped == 1
    # At word boundaries every word keeps its label ("do" and "n't" are unknown to this tokenizer).
    with pytest.warns(AlignmentWarning, match="2 of 3 labelled words .* unknown token"):
        split = data.encode(fast, tokenize="words")
    assert [data.label_names[i] for i in split.labels[0][1:]] == ["AUX", "PART", "VERB"]
    assert split.report.n_dropped == 0 and split.report.n_unknown == 2


def test_unknown_label_and_bad_options():
    sentence = LabelledSentence(("a",), ("X",), (False,))
    with pytest.raises(ValueError, match=r"labels \['X'\] that are not in label_names"):
        TokenLabelledDataset([sentence], ("Y",))
    with pytest.raises(ValueError, match="subtokens must be"):
        TokenLabelledDataset.from_sentences([sentence]).encode(char_tokenizer(), subtokens="last")


GOOD = "1\tHi\thi\tINTJ\t_\t_\t0\troot\t_\t_\n"


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("# c\n1 Hi hi INTJ _ _ 0 root _ _\n", 2, "expected 10 tab-separated columns"),
        (GOOD + "3\tyo\tyo\tINTJ\t_\t_\t1\tdep\t_\t_\n", 2, "word ID 3 where 2 was due"),
        (GOOD + "x\tyo\tyo\tINTJ\t_\t_\t1\tdep\t_\t_\n", 2, "not a CoNLL-U ID"),
        (
            GOOD + "2-3\tyo\t_\t_\t_\t_\t_\t_\t_\t_\n2\ty\ty\tX\t_\t_\t1\tdep\t_\t_\n",
            2,
            "reaches past the sentence",
        ),
        (GOOD + "3-4\tyo\t_\t_\t_\t_\t_\t_\t_\t_\n", 2, "must start at the next word, 2"),
        (GOOD + "2.1\tyo\tyo\tX\t_\t_\t_\t_\t1:dep\t_\n", 2, "empty node 2.1 must follow word 2"),
        (GOOD + "1.2\tyo\tyo\tX\t_\t_\t_\t_\t1:dep\t_\n", 2, "empty node 1.2 out of order"),
        (GOOD + "# late\n", 2, "comment line inside a sentence"),
        ("\n\n" + GOOD.replace("\t0\t", "\tzero\t"), 3, "head"),
    ],
)
def test_malformed_files_name_the_line_and_reason(text, line, reason):
    with pytest.raises(ConlluError, match=reason) as error:
        parse_conllu(text, source="bad.conllu")
    assert error.value.line == line
    assert str(error.value).startswith(f"bad.conllu, line {line}: ")


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.conllu"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert read_conllu(path, "upos").sentences[0].words == ("Hi",)
    assert parse_conllu("\ufeff" + GOOD).sentences[0].labels == ("INTJ",)


def test_a_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.conllu"
    path.write_bytes((GOOD + "\n1\tcafé\tcafé\tNOUN\t_\t_\t0\troot\t_\t_\n").encode("latin-1"))
    with pytest.raises(
        ConlluError, match=r"latin1.conllu, line 3: the file is not UTF-8 \(byte 0xE9 at column 6\)"
    ):
        read_conllu(path)


def test_a_column_function_that_raises_names_the_line():
    def broken(token):
        return token["feats"]["Number"]  # feats is None on this line

    with pytest.raises(
        ConlluError, match=r"bad.conllu, line 2: the column function 'broken' raised TypeError"
    ):
        parse_conllu("# c\n" + GOOD, broken, source="bad.conllu")


def test_an_all_empty_column_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        parse_conllu(GOOD, "xpos")


def test_shipped_sample_reads_and_aligns():
    data = read_conllu(SAMPLE, "upos")
    assert len(data) >= 3
    tok = build_tokenizer()
    with pytest.warns(AlignmentWarning, match="became the unknown token"):
        encoded = data.encode(tok)
    assert encoded.n_labelled == sum(len(s) for s in data.sentences)
    # The shipped vocabulary lacks three of the sample's words (one AUX, one PART, one VERB).
    assert encoded.report.unknown[encoded.report.unknown > 0].to_dict() == {"AUX": 1, "PART": 1, "VERB": 1}
    # Word by word, a glued full stop gains no space marker: the same tokens as the whole sentence.
    with pytest.warns(AlignmentWarning):
        by_word = data.encode(tok, tokenize="words")
    assert by_word.input_ids == encoded.input_ids
