"""A sparse autoencoder (SAE): its configuration, weights and forward pass, in SAELens's layout.

Weights: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for
JumpReLU (and BatchTopK at inference), ``threshold [d_sae]``. The encoder reads ``x - b_dec`` (SAELens's
``apply_b_dec_to_input``); the decoder is ``acts @ W_dec + b_dec``.

Architectures (``SAEConfig.architecture``):

- ``"standard"``: ReLU latents, trained with an L1 penalty.
- ``"topk"``: the k largest pre-activations of each token, ReLU'd (Gao et al. 2024).
- ``"batchtopk"``: the k x batch largest pre-activations of a whole batch during training; at inference a
  single threshold learnt during training (Bussmann et al. 2024), so each token's latents do not depend on
  the rest of its batch. SAELens stores it as ``"jumprelu"`` with that threshold everywhere.
- ``"jumprelu"``: ``pre * (pre > threshold)`` with a learnt threshold per latent (Rajamanoharan et al.
  2024), trained through straight-through pseudo-derivatives (:mod:`workbench.sae.training`).

The module carries SAELens's hook points (``hook_sae_input``, ``hook_sae_acts_pre``, ``hook_sae_acts_post``,
``hook_sae_recons``, ``hook_sae_error``, ``hook_sae_output``); :func:`workbench.sae.splice` makes them hook
points of the model while the SAE is spliced in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

__all__ = ["ARCHITECTURES", "SAE_HOOKS", "SAEConfig", "SparseAutoencoder"]

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
#: The SAE's own hook points, as SAELens names them.
SAE_HOOKS = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_recons",
    "hook_sae_error",
    "hook_sae_output",
)


@dataclass
class SAEConfig:
    """What an SAE is and where it reads. ``hook_name`` is the model hook it encodes (for ``attn.hook_z``
    the heads are flattened: ``d_in = n_heads * d_head``)."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = None  # topk / batchtopk: active latents per token
    hook_name: str = ""
    hook_layer: int = 0
    hook_head_index: int | None = None
    model_name: str = "apertus"
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True
    context_size: int | None = None
    prepend_bos: bool = True
    dataset_path: str = ""
    extra: dict = field(default_factory=dict)  # training settings and provenance, saved in cfg.json

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"Unknown SAE architecture {self.architecture!r}: choose one of {', '.join(ARCHITECTURES)}."
            )
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, not {self.d_in} and {self.d_sae}.")
        needs_k = self.architecture in ("topk", "batchtopk")
        if needs_k and (self.k is None or not 1 <= self.k <= self.d_sae):
            raise ValueError(
                f"A {self.architecture} SAE needs k between 1 and d_sae={self.d_sae} (got k={self.k})."
            )

    @property
    def reshape_z(self) -> bool:
        """Whether the hook is attn.hook_z, whose [.., head, d_head] activations are flattened."""
        return self.hook_name.endswith("hook_z")

    def to_dict(self) -> dict:
        return asdict(self)


class JumpReLUFunction(torch.autograd.Function):
    """``x * (x > threshold)`` with Rajamanoharan et al.'s pseudo-derivative for the threshold: a rectangle
    kernel of width ``bandwidth`` around it. ``x`` gets the plain gradient where the latent is on."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth: float):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold)

    @staticmethod
    def backward(ctx, grad):
        x, threshold = ctx.saved_tensors
        near = ((x - threshold).abs() < ctx.bandwidth / 2).to(x)
        grad_threshold = (-(threshold / ctx.bandwidth) * near * grad).reshape(-1, x.shape[-1]).sum(0)
        return (x > threshold) * grad, grad_threshold, None


class StepFunction(torch.autograd.Function):
    """``H(x - threshold)`` (a latent is on) with the same pseudo-derivative: what the L0 penalty
    differentiates."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth: float):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x)

    @staticmethod
    def backward(ctx, grad):
        x, threshold = ctx.saved_tensors
        near = ((x - threshold).abs() < ctx.bandwidth / 2).to(x)
        grad_threshold = (-(1.0 / ctx.bandwidth) * near * grad).reshape(-1, x.shape[-1]).sum(0)
        return None, grad_threshold, None


class SparseAutoencoder(nn.Module):
    """``encode(x) -> latents``, ``decode(latents) -> reconstruction``, ``forward(x) -> reconstruction``.

    ``x`` is ``[..., d_in]`` (or ``[..., head, d_head]`` for an ``attn.hook_z`` SAE; the output has the
    input's shape). ``training_mode`` makes BatchTopK rank over the whole batch.
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        if cfg.architecture in ("jumprelu", "batchtopk"):
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        for name in SAE_HOOKS:
            setattr(self, name, HookPoint())
        self.training_mode = False
        self.bandwidth = 1e-3  # JumpReLU pseudo-derivative kernel width (training only)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Unit-norm random decoder rows, the encoder their transpose (Gao et al.'s tied initialisation)."""
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=gen)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # --------------------------------------------------------------------------------------- forward
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x).to(self.W_enc.dtype)
        x = self.hook_sae_input(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return self.hook_sae_acts_pre(x @ self.W_enc + self.b_enc)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        arch = self.cfg.architecture
        if arch == "standard":
            return torch.relu(pre)
        if arch == "topk" or (arch == "batchtopk" and self.training_mode):
            return _topk(pre, self.cfg.k, over_batch=arch == "batchtopk")
        if self.training_mode:  # jumprelu
            return JumpReLUFunction.apply(torch.relu(pre), self.threshold, self.bandwidth)
        return torch.relu(pre) * (pre > self.threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_sae]``."""
        return self.hook_sae_acts_post(self.activation(self.pre_activations(x)))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_in]`` (flat: see :meth:`unflatten`)."""
        return self.hook_sae_recons(acts @ self.W_dec + self.b_dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unflatten(self.decode(self.encode(x)), x)

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.reshape_z and x.shape[-1] != self.cfg.d_in:
            x = x.flatten(-2)
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"This SAE reads {self.cfg.d_in}-dimensional activations "
                f"({self.cfg.hook_name or 'its hook'}) "
                f"but got shape {tuple(x.shape)}: splice it at the hook it was trained on."
            )
        return x

    def unflatten(self, flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return flat.reshape(like.shape).to(like.dtype)

    # ------------------------------------------------------------------------------------- weights
    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm (the constraint training keeps)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on ``scale * x`` read ``x`` itself (same latents, reconstruction / scale)."""
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    def feature_directions(self) -> torch.Tensor:
        """Unit decoder rows ``[d_sae, d_in]``: what each latent writes into the activation."""
        w = self.W_dec.detach().float()
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def __repr__(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else ""
        return f"SparseAutoencoder({c.architecture}{k}, {c.d_in} -> {c.d_sae}, hook {c.hook_name!r})"


def _topk(pre: torch.Tensor, k: int, over_batch: bool) -> torch.Tensor:
    if over_batch:
        flat = pre.reshape(-1)
        keep = min(k * (flat.numel() // pre.shape[-1]), flat.numel())
        values, index = flat.topk(keep, sorted=False)
        return torch.zeros_like(flat).scatter(0, index, torch.relu(values)).reshape(pre.shape)
    values, index = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, index, torch.relu(values))
