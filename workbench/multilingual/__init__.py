"""Multilingual analyses: which language a model thinks in, language neurons, cross-lingual probes, fertility.

* :mod:`~workbench.multilingual.latent`: the latent-language lens (Wendler et al. 2024).
* :mod:`~workbench.multilingual.neurons`: per-language xIELU activation probabilities, LAPE (Tang et al.
  2024), language-neuron selection and ablation.
* :mod:`~workbench.multilingual.crosslingual`: probes trained on one language, tested on others.
* :mod:`~workbench.multilingual.fertility`: tokens per word and per character by language.

The data side (the multilingual grammar and translation prompts) is :mod:`workbench.data.multilingual`; the
multilingual embedded checkpoint is ``workbench/checkpoint/apertus-tiny-multi`` (:data:`MULTI_CHECKPOINT`).
"""

from workbench.checkpoint.train_multilingual import MULTI_CHECKPOINT
from workbench.multilingual.crosslingual import CrossLingualProbes, cross_lingual_probes, unify_labels
from workbench.multilingual.fertility import fertility_table
from workbench.multilingual.latent import LatentLens, latent_language_lens
from workbench.multilingual.neurons import (
    ACTIVE_REGIME,
    LanguageActivation,
    NeuronAblation,
    ablate_neurons,
    language_activation,
    language_losses,
    lape,
    neurons_by_language,
    random_neurons,
    select_language_neurons,
)

__all__ = [
    "ACTIVE_REGIME",
    "MULTI_CHECKPOINT",
    "CrossLingualProbes",
    "LanguageActivation",
    "LatentLens",
    "NeuronAblation",
    "ablate_neurons",
    "cross_lingual_probes",
    "fertility_table",
    "lape",
    "language_activation",
    "language_losses",
    "latent_language_lens",
    "neurons_by_language",
    "random_neurons",
    "select_language_neurons",
    "unify_labels",
]
