"""Tokenizer fertility: how many tokens a language costs, per word and per character.

For each language, from plain texts, a :class:`~workbench.data.alignment.TokenLabelledDataset` or a CoNLL-U
file: words (whitespace-separated words of a text; a dataset's words; a CoNLL-U file's *surface* tokens, so
that a multiword token such as "du" = "de le" counts once, as written), characters (without spaces) and
tokens (special tokens excluded). Fertility is tokens per word (Rust et al. 2021); tokens per character
compares scripts and languages whose words differ in length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from workbench.data.alignment import TokenLabelledDataset
from workbench.data.conllu import read_conllu

__all__ = ["fertility_table", "texts_of"]

Corpus = Sequence[str] | TokenLabelledDataset | str | Path


def texts_of(corpus: Corpus) -> tuple[list[str], int]:
    """The texts of a corpus and its number of words (see the module docstring)."""
    if isinstance(corpus, (str, Path)):
        path = Path(corpus)
        if path.suffix != ".conllu":
            raise ValueError(
                f"{corpus!r} is a single string: give a list of texts, or the path of a .conllu file."
            )
        corpus = read_conllu(path, "form", multiword="surface")
    if isinstance(corpus, TokenLabelledDataset):
        return [s.text for s in corpus.sentences], sum(len(s) for s in corpus.sentences)
    texts = list(corpus)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("A corpus is a list of texts, a TokenLabelledDataset or a .conllu path.")
    return texts, sum(len(t.split()) for t in texts)


def fertility_table(tokenizer_or_model, corpora: Mapping[str, Corpus]) -> pd.DataFrame:
    """One row per language: sentences, words, characters, tokens, ``tokens_per_word``, ``tokens_per_char``.

    tokenizer_or_model: a transformers tokenizer or a model with a ``.tokenizer``."""
    tokenizer = getattr(tokenizer_or_model, "tokenizer", tokenizer_or_model)
    if not corpora:
        raise ValueError("Give at least one language: {'en': texts, 'de': 'de.conllu', ...}.")
    rows = []
    for language, corpus in corpora.items():
        texts, words = texts_of(corpus)
        if not texts or words == 0:
            raise ValueError(f"Language {language!r} has no words.")
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        tokens = sum(len(x) for x in ids)
        chars = sum(len("".join(t.split())) for t in texts)
        rows.append(
            {
                "language": language,
                "sentences": len(texts),
                "words": words,
                "characters": chars,
                "tokens": tokens,
                "tokens_per_word": tokens / words,
                "tokens_per_char": tokens / chars,
            }
        )
    return pd.DataFrame(rows).set_index("language")
