"""Training an SAE on a stream of activations: losses, dead latents, decoder norms, resumable checkpoints.

Losses (all on activations rescaled so that their mean squared norm is ``d_in``, a factor folded into the
weights at the end, as SAELens's ``expected_average_only_in`` normalisation does):

- reconstruction: squared error summed over the activation, averaged over tokens;
- ``standard``: plus ``l1_coefficient`` x the L1 norm of the latents (decoder rows have unit norm);
- ``jumprelu``: plus ``l0_coefficient`` x the number of active latents, differentiated through the
  step function's pseudo-derivative (Rajamanoharan et al. 2024, rectangle kernel of width ``bandwidth``);
- ``topk`` / ``batchtopk``: sparsity is the architecture's; BatchTopK learns its inference threshold as a
  running average of the smallest active latent of each batch;
- every architecture: the AuxK loss of Gao et al. 2024 (``aux_coefficient``, default 1/32): the
  ``aux_k`` largest pre-activations of *dead* latents (none active for ``dead_after`` tokens) reconstruct
  the residual error, which gives dead latents a gradient back towards the data.

After every Adam step the decoder rows are renormalised to unit norm. ``folder=`` writes a checkpoint
(safetensors for the SAE, Adam's moments and the dead-latent counters; JSON for the step, the settings and
the log) every ``checkpoint_every`` steps; calling :func:`train_sae` again with the same source and settings
resumes from it and gives the same SAE as an uninterrupted run. The finished SAE is saved there in
SAELens's format (:func:`workbench.sae.save_sae`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from workbench.sae.files import load_sae, save_sae
from workbench.sae.model import SAEConfig, SparseAutoencoder, StepFunction
from workbench.sae.sources import HarvestSource, TensorSource

__all__ = ["TrainConfig", "TrainingResult", "train_sae"]

CHECKPOINT = "checkpoint"


@dataclass
class TrainConfig:
    """Training settings. ``d_sae`` defaults to ``expansion x d_in``; ``k`` is the TopK/BatchTopK sparsity."""

    architecture: str = "topk"
    expansion: int = 8
    d_sae: int | None = None
    k: int | None = 16
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    lr_decay_fraction: float = 0.2  # linear decay to 0 over the last part of training
    l1_coefficient: float = 1.0  # standard
    l0_coefficient: float = 0.5  # jumprelu
    jumprelu_init_threshold: float = 0.1
    bandwidth: float = 0.1
    batchtopk_threshold_lr: float = 0.01
    aux_coefficient: float = 1 / 32
    aux_k: int | None = None  # default d_in // 2
    dead_after: int = 50_000  # tokens without activating before a latent counts as dead
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    device: str | None = None  # default: cuda when available


@dataclass
class TrainingResult:
    """The trained SAE (reading unscaled activations), its training log and the throughput."""

    sae: SparseAutoencoder
    history: pd.DataFrame  # step, loss, mse, explained_variance, l0, dead_fraction, aux_loss, lr
    scale: float  # the input scale used in training (already folded into the SAE)
    activations_per_second: float

    def figure(self):
        """The training curves: explained variance, L0 and dead fraction against the step."""
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=3, subplot_titles=("explained variance", "L0", "dead latents"))
        for col, key in enumerate(("explained_variance", "l0", "dead_fraction"), start=1):
            fig.add_scatter(x=self.history.step, y=self.history[key], row=1, col=col, showlegend=False)
        fig.update_xaxes(title_text="step")
        fig.update_layout(height=300, margin=dict(t=40, b=40, l=40, r=20))
        return fig


def train_sae(
    source: HarvestSource | TensorSource,
    config: TrainConfig | None = None,
    *,
    folder: str | Path | None = None,
    model_name: str = "apertus",
    progress: bool = True,
    **overrides,
) -> TrainingResult:
    """Train an SAE on ``source`` (see the module docstring); keyword ``overrides`` set TrainConfig fields.

    source: ``HarvestSource(harvest, hook)`` streams one hook of a harvest from disk; ``TensorSource(x,
        hook)`` feeds activations in memory (tests, benchmarks).
    folder: where checkpoints and the finished SAE go (resumes from a checkpoint there).
    """
    config = TrainConfig(**{**asdict(config or TrainConfig()), **overrides})
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sae_cfg = SAEConfig(
        d_in=source.width,
        d_sae=config.d_sae or config.expansion * source.width,
        architecture=config.architecture,
        k=config.k if config.architecture in ("topk", "batchtopk") else None,
        hook_name=source.hook,
        hook_layer=_layer_of(source.hook),
        model_name=model_name,
        extra={"training": _json_safe(asdict(config)), "source": repr(source)},
    )
    trainer = _Trainer(source, config, sae_cfg, device)
    folder = Path(folder) if folder is not None else None
    if folder is not None and trainer.resume(folder) and trainer.step >= config.steps:
        return trainer.result(folder, elapsed=0.0, seen=0)
    bar = tqdm(
        total=config.steps, initial=trainer.step, desc=f"SAE {config.architecture}", disable=not progress
    )
    start, seen = time.perf_counter(), 0
    try:
        for batch in source.batches(config.batch_size, config.seed, trainer.step):
            if trainer.step >= config.steps:
                break
            trainer.train_step(batch.to(device, non_blocking=True))
            seen += len(batch)
            bar.update(1)
            if trainer.history and trainer.history[-1]["step"] == trainer.step:
                bar.set_postfix(
                    ev=f"{trainer.history[-1]['explained_variance']:.3f}",
                    l0=f"{trainer.history[-1]['l0']:.1f}",
                )
            if folder is not None and trainer.step % config.checkpoint_every == 0:
                trainer.save_checkpoint(folder)
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if folder is not None:
        trainer.save_checkpoint(folder)
    return trainer.result(folder, elapsed, seen)


class _Trainer:
    """The state of one training run: SAE, optimiser, dead-latent counters, log, step."""

    def __init__(self, source, config: TrainConfig, sae_cfg: SAEConfig, device: torch.device) -> None:
        self.source, self.config, self.device = source, config, device
        self.sae = SparseAutoencoder(sae_cfg)
        self.sae.reset_parameters(config.seed)
        self.sae.bandwidth = config.bandwidth
        first = next(source.batches(min(4096, source.n_rows), config.seed)).float()
        # One scale for the whole run: mean squared norm d_in (SAELens's expected_average_only_in).
        self.scale = float((sae_cfg.d_in / first.pow(2).sum(-1).mean()).sqrt())
        with torch.no_grad():
            self.sae.b_dec.copy_(first.mean(0) * self.scale)
            if sae_cfg.architecture == "jumprelu":
                self.sae.threshold.fill_(config.jumprelu_init_threshold)
        self.sae.to(device).train()
        self.sae.training_mode = True
        trained = [
            p
            for n, p in self.sae.named_parameters()
            if n != "threshold" or sae_cfg.architecture == "jumprelu"
        ]
        self.optimizer = torch.optim.Adam(trained, lr=config.lr)
        self.since_fired = torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=device)
        self.step = 0
        self.history: list[dict] = []

    def lr_at(self, step: int) -> float:
        c = self.config
        decay_start = int(c.steps * (1 - c.lr_decay_fraction))
        if step < decay_start:
            return c.lr
        return c.lr * max(0.0, (c.steps - step) / max(1, c.steps - decay_start))

    def train_step(self, x: torch.Tensor) -> None:
        c, sae = self.config, self.sae
        x = x * self.scale
        pre = sae.pre_activations(x)
        acts = sae.activation(pre)
        recon = sae.decode(acts)
        error = x - recon
        mse = error.pow(2).sum(-1).mean()
        loss = mse
        if sae.cfg.architecture == "standard":
            loss = loss + c.l1_coefficient * acts.abs().sum(-1).mean()
        elif sae.cfg.architecture == "jumprelu":
            loss = (
                loss + c.l0_coefficient * StepFunction.apply(pre, sae.threshold, sae.bandwidth).sum(-1).mean()
            )
        dead = self.since_fired >= c.dead_after
        aux = (
            self.aux_loss(pre, error.detach(), dead) if bool(dead.any()) else torch.zeros((), device=x.device)
        )
        loss = loss + c.aux_coefficient * aux
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            sae.normalize_decoder()
            if sae.cfg.architecture == "jumprelu":
                sae.threshold.clamp_(min=1e-4)
            fired = (acts > 0).any(0)
            self.since_fired += len(x)
            self.since_fired[fired] = 0
            if sae.cfg.architecture == "batchtopk" and bool((acts > 0).any()):
                smallest = acts[acts > 0].min()
                lr = 1.0 if self.step == 0 else c.batchtopk_threshold_lr
                sae.threshold.mul_(1 - lr).add_(lr * smallest)
        self.step += 1
        if self.step % c.log_every == 0 or self.step == c.steps:
            self.log(x, error, acts, loss, aux)

    def aux_loss(self, pre: torch.Tensor, error: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        k_aux = min(self.config.aux_k or max(1, self.sae.cfg.d_in // 2), int(dead.sum()))
        masked = pre.masked_fill(~dead, float("-inf"))
        values, index = masked.topk(k_aux, dim=-1, sorted=False)
        aux_acts = torch.zeros_like(pre).scatter(-1, index, torch.relu(values))
        return (error - aux_acts @ self.sae.W_dec).pow(2).sum(-1).mean()

    @torch.no_grad()
    def log(self, x, error, acts, loss, aux) -> None:
        total = (x - x.mean(0)).pow(2).sum()
        self.history.append(
            {
                "step": self.step,
                "loss": float(loss),
                "mse": float(error.pow(2).sum(-1).mean()) / self.scale**2,
                "explained_variance": float(1 - error.pow(2).sum() / total),
                "l0": float((acts > 0).float().sum(-1).mean()),
                "dead_fraction": float((self.since_fired >= self.config.dead_after).float().mean()),
                "aux_loss": float(aux),
                "lr": self.lr_at(self.step - 1),
            }
        )

    # --------------------------------------------------------------------------------- checkpoints
    def _identity(self) -> dict:
        return {"config": _json_safe(asdict(self.config)), "source": self.source.fingerprint()}

    def save_checkpoint(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"sae.{n}": p.detach().cpu().contiguous() for n, p in self.sae.named_parameters()}
        tensors["since_fired"] = self.since_fired.cpu()
        names = {id(p): n for n, p in self.sae.named_parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    if key in state:
                        tensors[f"adam.{names[id(p)]}.{key}"] = (
                            torch.as_tensor(state[key]).detach().cpu().contiguous()
                        )
        _atomic(folder / f"{CHECKPOINT}.safetensors", lambda tmp: save_file(tensors, tmp))
        meta = {**self._identity(), "step": self.step, "scale": self.scale, "history": self.history}
        _atomic(folder / f"{CHECKPOINT}.json", lambda tmp: Path(tmp).write_text(json.dumps(meta)))

    def resume(self, folder: Path) -> bool:
        path = folder / f"{CHECKPOINT}.json"
        if not path.exists():
            return False
        meta = json.loads(path.read_text())
        if {k: meta.get(k) for k in ("config", "source")} != self._identity():
            raise FileExistsError(
                f"{folder} holds a checkpoint of another training run (other settings or activations): "
                "train into another folder, or delete it to start again."
            )
        tensors = load_file(str(folder / f"{CHECKPOINT}.safetensors"), device=str(self.device))
        with torch.no_grad():
            for n, p in self.sae.named_parameters():
                p.copy_(tensors[f"sae.{n}"])
        self.since_fired = tensors["since_fired"].to(self.device)
        for n, p in self.sae.named_parameters():
            if f"adam.{n}.exp_avg" in tensors:
                state = self.optimizer.state[p]
                state["exp_avg"] = tensors[f"adam.{n}.exp_avg"].clone()
                state["exp_avg_sq"] = tensors[f"adam.{n}.exp_avg_sq"].clone()
                state["step"] = tensors[f"adam.{n}.step"].cpu().clone()
        self.step, self.scale, self.history = meta["step"], meta["scale"], meta["history"]
        return True

    def result(self, folder: Path | None, elapsed: float, seen: int) -> TrainingResult:
        sae = SparseAutoencoder(self.sae.cfg)
        sae.load_state_dict(self.sae.state_dict())
        sae.fold_input_scale(self.scale)
        sae.eval()
        if folder is not None:
            save_sae(sae, folder)
            sae = load_sae(folder)
        sae = sae.to(self.device)
        rate = seen / elapsed if elapsed > 0 else float("nan")
        return TrainingResult(sae, pd.DataFrame(self.history), self.scale, rate)


def _layer_of(hook: str) -> int:
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else 0


def _json_safe(value: dict) -> dict:
    return json.loads(json.dumps(value, default=str))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)
