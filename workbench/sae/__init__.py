"""Sparse autoencoders: train on harvested activations, save in SAELens's format, splice into the model,
read, patch and steer their features.

- :func:`train_sae` on a :class:`HarvestSource` (one hook of a :func:`workbench.probing.harvest` folder,
  streamed) or a :class:`TensorSource`; TopK, BatchTopK, ReLU + L1 and JumpReLU.
- :func:`save_sae` / :func:`load_sae`: SAELens's ``cfg.json`` + ``sae_weights.safetensors``.
"""

from workbench.sae.files import load_sae, save_sae
from workbench.sae.model import ARCHITECTURES, SAE_HOOKS, SAEConfig, SparseAutoencoder
from workbench.sae.sources import HarvestSource, TensorSource
from workbench.sae.training import TrainConfig, TrainingResult, train_sae

__all__ = [
    "ARCHITECTURES",
    "SAE_HOOKS",
    "HarvestSource",
    "SAEConfig",
    "SparseAutoencoder",
    "TensorSource",
    "TrainConfig",
    "TrainingResult",
    "load_sae",
    "save_sae",
    "train_sae",
]
