"""The one word-level tokenizer builder: the shipped checkpoints' tokenizers and the random test checkpoints'.

One token per word of :func:`workbench.data.corpus.vocabulary` (or of any word list), so every name and
every IOI answer is a single token. A ``Metaspace`` pre-tokenizer marks the leading space as ``▁``
(" Mary" and "Mary" are both the token ``▁Mary``), punctuation is split off, ``<s>`` is prepended by the
post-processor, and the special-token ids follow ``ApertusConfig``'s defaults (``<unk>``=0, ``<s>``=1,
``</s>``=2, ``<pad>``=3). Decoding is the concatenation of the tokens' surface forms, spaces included:
``decode([id_of_Mary])`` is ``" Mary"``, and
``decode(tokenizer("The dog ran.").input_ids, skip_special_tokens=True)`` is ``" The dog ran."`` (with a
leading space).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from workbench.data.corpus import vocabulary

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
SPACE = "▁"


def _token(word: str) -> str:
    # The Punctuation pre-tokenizer splits "store," into "▁store" and ",": punctuation carries no marker.
    return word if not word.isalnum() else SPACE + word


def build_tokenizer(words: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Build the tokenizer over ``words`` (default: the whole corpus vocabulary).

    words: the vocabulary after the four special tokens, ids in the order given (repeats are skipped); the
        shipped checkpoints pass sorted lists, so their tokenizer files come out byte-identical.
    """
    words = vocabulary() if words is None else words
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(_token(w), len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    # Keep every token's leading space when decoding, as byte-level BPE does: the text-generation pipeline
    # decodes the new tokens on their own and appends them to the prompt, so stripping the first space
    # would glue " Mary" onto "to". The price: decoding a whole text gives it a leading space.
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
