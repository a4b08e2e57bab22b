"""Sparse autoencoders: train on harvested activations, save in SAELens's format, splice into the model,
read, patch and steer their features.

- :func:`train_sae` on a :class:`HarvestSource` (one hook of a :func:`workbench.probing.harvest` folder,
  streamed) or a :class:`TensorSource`; TopK, BatchTopK, ReLU + L1 and JumpReLU.
- :func:`save_sae` / :func:`load_sae`: SAELens's ``cfg.json`` + ``sae_weights.safetensors``.
- :func:`evaluate_saes`: MSE, explained variance, L0, dead/dense latents, next-token loss recovered.
- :func:`splice` (latents as hook points, patched as the component ``("sae_latents", sae)`` of a
  :class:`workbench.patching.PatchingExperiment`), :func:`steering_hook`.
- :func:`feature_statistics`, :func:`feature_output_tokens`, :func:`nearest_features` (the feature view:
  :class:`workbench.widgets.sae.FeatureView`).
"""

from workbench.sae.features import (
    FeatureStatistics,
    feature_output_tokens,
    feature_statistics,
    nearest_features,
    residual_direction,
)
from workbench.sae.files import load_sae, save_sae
from workbench.sae.metrics import evaluate_saes
from workbench.sae.model import ARCHITECTURES, SAE_HOOKS, SAEConfig, SparseAutoencoder
from workbench.sae.sources import HarvestSource, TensorSource, text_dataset
from workbench.sae.splice import latent_hook, splice, steering_hook
from workbench.sae.training import TrainConfig, TrainingResult, train_sae

__all__ = [
    "ARCHITECTURES",
    "FeatureStatistics",
    "evaluate_saes",
    "feature_output_tokens",
    "feature_statistics",
    "latent_hook",
    "nearest_features",
    "residual_direction",
    "splice",
    "steering_hook",
    "SAE_HOOKS",
    "HarvestSource",
    "SAEConfig",
    "SparseAutoencoder",
    "TensorSource",
    "TrainConfig",
    "TrainingResult",
    "load_sae",
    "save_sae",
    "text_dataset",
    "train_sae",
]
