"""Bad input to the data tools, one row per case: the call, the exception type, a phrase of its message.

The same table format as ``test_bad_input.py`` (rows of ``(id, callable, exception type, phrase)``; a row's
callable takes the shared context ``c``): CoNLL-U files and columns, word-to-token alignment, unknown tokens,
token display text and the synthetic checkpoints. Warnings that tell of lost labels are raised as errors here
so that their message is checked too.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from workbench.checkpoint.synthetic import make_random_checkpoint
from workbench.checkpoint.tokenizer import build_tokenizer
from workbench.data.alignment import AlignmentError, AlignmentWarning, LabelledSentence, TokenLabelledDataset
from workbench.data.conllu import ConlluError, parse_conllu, read_conllu
from workbench.data.corpus import repeated_token_ids
from workbench.token_text import display_tokens

GOOD = "1\tHi\thi\tINTJ\t_\t_\t0\troot\t_\t_\n"
WORD2 = "2\tyo\tyo\tINTJ\t_\t_\t1\tdep\t_\t_\n"


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-data")
    (tmp / "latin1.conllu").write_bytes(
        (GOOD + "\n1\tcafé\tcafé\tNOUN\t_\t_\t0\troot\t_\t_\n").encode("latin-1")
    )
    (tmp / "folder.conllu").mkdir()
    glued = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "don't": 2, "stop": 3}, unk_token="<unk>"))
    glued.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return SimpleNamespace(
        tmp=tmp,
        tok=build_tokenizer(),
        glued=PreTrainedTokenizerFast(tokenizer_object=glued, bos_token="<s>", unk_token="<unk>"),
    )


def parse(text, *args, **kwargs):
    return lambda c: parse_conllu(text, *args, source="bad.conllu", **kwargs)


def sentence(words=("a", "b"), labels=("X", "Y"), space=(True, False), source="s.conllu:1"):
    return LabelledSentence(tuple(words), tuple(labels), tuple(space), source=source)


def dataset(*sentences):
    return TokenLabelledDataset.from_sentences(list(sentences) or [sentence()])


def strict(fn):
    """``fn`` with alignment warnings raised as errors."""

    def run(c):
        with warnings.catch_warnings():
            warnings.simplefilter("error", AlignmentWarning)
            fn(c)

    return run


def raising_column(token):
    return token["feats"]["Number"]


UNKNOWN = sentence(("The", "zorblax", "ran"), ("DET", "NOUN", "VERB"), (True, True, False))
GLUED = sentence(("do", "n't", "stop"), ("AUX", "PART", "VERB"), (False, True, False))

ROWS = [
    # --- CoNLL-U files
    (
        "conllu-missing-file",
        lambda c: read_conllu(c.tmp / "nope.conllu"),
        FileNotFoundError,
        "No CoNLL-U file",
    ),
    ("conllu-folder", lambda c: read_conllu(c.tmp / "folder.conllu"), IsADirectoryError, "is a folder"),
    (
        "conllu-not-utf8",
        lambda c: read_conllu(c.tmp / "latin1.conllu"),
        ConlluError,
        "line 3: the file is not UTF-8",
    ),
    ("conllu-spaces", parse("1 Hi hi INTJ _ _ 0 root _ _\n"), ConlluError, "separated by spaces"),
    (
        "conllu-id-order",
        parse(GOOD + WORD2.replace("2\t", "3\t", 1)),
        ConlluError,
        "word ID 3 where 2 was due",
    ),
    ("conllu-bad-id", parse(GOOD + WORD2.replace("2\t", "x\t", 1)), ConlluError, "not a CoNLL-U ID"),
    (
        "conllu-range-past-end",
        parse(GOOD + "2-3\tyo\t_\t_\t_\t_\t_\t_\t_\t_\n" + WORD2),
        ConlluError,
        "reaches past the sentence",
    ),
    (
        "conllu-range-of-one",
        parse(GOOD + "2-2\tyo\t_\t_\t_\t_\t_\t_\t_\t_\n" + WORD2),
        ConlluError,
        "at least two",
    ),
    (
        "conllu-overlapping-ranges",
        parse("1-2\tab\t_\t_\t_\t_\t_\t_\t_\t_\n2-3\tbc\t_\t_\t_\t_\t_\t_\t_\t_\n" + GOOD),
        ConlluError,
        "must start at the next word",
    ),
    (
        "conllu-empty-node-place",
        parse(GOOD + "2.1\tyo\tyo\tX\t_\t_\t_\t_\t1:dep\t_\n"),
        ConlluError,
        "must follow word 2",
    ),
    ("conllu-comment-inside", parse(GOOD + "# late\n"), ConlluError, "comment line inside a sentence"),
    ("conllu-head-not-int", parse(GOOD.replace("\t0\t", "\tzero\t")), ConlluError, "head"),
    ("conllu-empty-form", parse(GOOD.replace("\tHi\t", "\t\t")), ConlluError, "FORM column is empty"),
    ("conllu-no-sentence", parse("\n\n"), ConlluError, "holds no sentence"),
    (
        "conllu-comments-only",
        parse("# sent_id = 1\n# text = hi\n"),
        ConlluError,
        "comments but no word lines",
    ),
    # --- columns
    ("column-all-empty", parse(GOOD, "xpos"), ValueError, "is empty ('_') for every word"),
    ("column-unknown", parse(GOOD, "postag"), ValueError, "Unknown CoNLL-U column 'postag'"),
    ("column-key-on-upos", parse(GOOD, "upos:Number"), ValueError, "only feats and misc have keys"),
    ("column-not-a-name", parse(GOOD, 3), TypeError, "column must be a column name or a function"),
    ("column-function-raises", parse(GOOD, raising_column), ConlluError, "line 1: the column function"),
    ("multiword-option", parse(GOOD, multiword="both"), ValueError, "multiword must be 'words' or 'surface'"),
    # --- sentences and datasets
    ("sentence-no-words", lambda c: sentence((), (), ()), ValueError, "has no words"),
    (
        "sentence-lengths",
        lambda c: sentence(("a",), ("X", "Y"), (True,)),
        ValueError,
        "give one of each per word",
    ),
    ("sentence-spaced-word", lambda c: sentence((" a", "b")), ValueError, "without surrounding whitespace"),
    (
        "labels-not-in-names",
        lambda c: TokenLabelledDataset([sentence()], ("X",)),
        ValueError,
        "not in label_names",
    ),
    (
        "labels-duplicated",
        lambda c: TokenLabelledDataset([sentence()], ("X", "Y", "X")),
        ValueError,
        "duplicates",
    ),
    (
        "from-tagged-labelling",
        lambda c: TokenLabelledDataset.from_tagged([], "tense"),
        ValueError,
        "labelling must be",
    ),
    # --- alignment
    (
        "encode-subtokens",
        lambda c: dataset().encode(c.tok, subtokens="last"),
        ValueError,
        "subtokens must be",
    ),
    ("encode-tokenize", lambda c: dataset().encode(c.tok, tokenize="chars"), ValueError, "tokenize must be"),
    (
        "encode-warn-above",
        lambda c: dataset().encode(c.tok, warn_above=2),
        ValueError,
        "warn_above is a share",
    ),
    ("encode-max-length", lambda c: dataset().encode(c.tok, max_length=0), ValueError, "max_length must be"),
    ("encode-slow-tokenizer", lambda c: dataset().encode(object()), TypeError, "not a fast tokenizer"),
    ("encode-nothing-fits", lambda c: dataset().encode(c.tok, max_length=1), AlignmentError, "No sentence"),
    (
        "encode-unknown-words",
        strict(lambda c: dataset(UNKNOWN).encode(c.tok)),
        AlignmentWarning,
        "1 of 3 labelled words (33.3%) became the unknown token (NOUN 1)",
    ),
    (
        "encode-dropped-words",
        strict(lambda c: dataset(GLUED).encode(c.glued)),
        AlignmentWarning,
        "have no token of their own and are not labelled (PART 1)",
    ),
    (
        "encode-skipped-sentence",
        strict(
            lambda c: dataset(sentence(), sentence(tuple("abcdefg"), ("X",) * 7, (True,) * 7, "t:9")).encode(
                c.tok, max_length=4, warn_above=1.0
            )
        ),
        AlignmentWarning,
        "Skipped 1 sentences that cannot be encoded: t:9",
    ),
    # --- token display text and synthetic data
    (
        "display-out-of-vocab",
        lambda c: display_tokens(c.tok, [10**6]),
        ValueError,
        "not in this tokenizer's vocab",
    ),
    ("display-negative-id", lambda c: display_tokens(c.tok, [-1]), ValueError, "integers 0.."),
    ("display-two-rows", lambda c: display_tokens(c.tok, [[1, 2]]), ValueError, "one sequence of token ids"),
    ("display-one-int", lambda c: display_tokens(c.tok, 3), TypeError, "for one id use display_token"),
    ("display-partial", lambda c: display_tokens(c.tok, [1], partial="x"), ValueError, "partial must be"),
    ("repeated-too-long", lambda c: repeated_token_ids(c.tok, 2, 10**6), ValueError, "exceeds the"),
    (
        "checkpoint-tokenizer-kind",
        lambda c: make_random_checkpoint(c.tmp / "x", tokenizer="gpt2"),
        ValueError,
        "tokenizer must be 'words' or 'tekken'",
    ),
    (
        "checkpoint-tekken-vocab",
        lambda c: make_random_checkpoint(c.tmp / "y", tokenizer="tekken", vocab=500),
        ValueError,
        "has 131072 tokens; vocab=500",
    ),
]


@pytest.mark.parametrize("case", ROWS, ids=[row[0] for row in ROWS])
def test_bad_data_input_gets_a_clear_error(c, case):
    _, call, expected, phrase = case
    with pytest.raises(expected) as error:
        call(c)
    assert phrase in str(error.value), f"{type(error.value).__name__}: {error.value}"


def test_ids_are_unique_and_the_table_is_large():
    assert len({row[0] for row in ROWS}) == len(ROWS) >= 15
