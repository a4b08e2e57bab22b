"""Datasets with known ground truth: the seeded synthetic corpus (:mod:`workbench.data.corpus`) and more."""

from workbench.data.alignment import (
    AlignmentError,
    AlignmentReport,
    AlignmentWarning,
    EncodedDataset,
    LabelledSentence,
    TokenLabelledDataset,
)
from workbench.data.corpus import (
    EVAL_SEED,
    IOIBatch,
    IOIPrompt,
    TaggedSentence,
    encode_ioi,
    ioi_prompts,
    repeated_sequences,
    repeated_token_ids,
    tagged_sentences,
    training_corpus,
)

__all__ = [
    "AlignmentError",
    "AlignmentReport",
    "AlignmentWarning",
    "EncodedDataset",
    "LabelledSentence",
    "TokenLabelledDataset",
    "EVAL_SEED",
    "IOIBatch",
    "IOIPrompt",
    "TaggedSentence",
    "encode_ioi",
    "ioi_prompts",
    "repeated_sequences",
    "repeated_token_ids",
    "tagged_sentences",
    "training_corpus",
]
