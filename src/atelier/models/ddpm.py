"""Denoising diffusion probabilistic model (Ho et al. 2020) as a LightningModule."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from lightning import LightningModule
from torch import nn

from atelier.models.ema import make_ema
from atelier.models.optim import OptimizerFactory, SchedulerFactory, optimizers_config
from atelier.sampling.schedulers import SAMPLERS, make_scheduler

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")



def _check_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"model.{key}={value!r} is not allowed; choose one of {list(allowed)}")


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023, Eq. 5 and its ε-/v-forms).

    The x0-loss weight is ``min(SNR, γ)``; expressed for the MSE on the network's own target it becomes
    ``min(SNR, γ) / SNR`` for ε-prediction and ``min(SNR, γ) / (SNR + 1)`` for v-prediction.

    Args:
        snr: ``(B,)`` float, signal-to-noise ratio ``ᾱ_t / (1 - ᾱ_t)`` of each sample's timestep.
        gamma: the clamp γ (the paper uses 5).
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
    """
    clamped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clamped / snr
    if prediction_type == "v_prediction":
        return clamped / (snr + 1)
    return clamped


class DDPM(LightningModule):
    """DDPM training (simple loss, Ho et al. 2020 Eq. 14) with EMA weights and diffusers samplers.

    Args:
        net: noise-prediction network, called as ``net(x_t, t).sample`` with ``x_t`` ``(B, C, H, W)`` float in
            about ``[-1, 1]`` and ``t`` ``(B,)`` int64; typically a diffusers ``UNet2DModel``.
        optimizer: partial optimiser, called with the network's parameters (e.g. ``AdamW`` with ``lr``).
        lr_scheduler: optional partial, called as ``lr_scheduler(optimizer=..., num_training_steps=...)``, e.g.
            ``diffusers.optimization.get_scheduler`` with ``name`` and ``num_warmup_steps``; stepped per step.
        num_train_timesteps: diffusion steps T.
        beta_schedule: ``linear`` (Ho et al.), ``scaled_linear`` or ``squaredcos_cap_v2`` (cosine, Nichol &
            Dhariwal 2021).
        prediction_type: ``epsilon`` (ε-prediction), ``v_prediction`` (Salimans & Ho 2022) or ``sample`` (x0).
        min_snr_gamma: γ of min-SNR loss weighting (Hang et al. 2023); ``None`` for the plain MSE.
        ema_decay: maximum EMA decay; ``ema_warmup`` ramps it as ``(1 + n) / (10 + n)``.
        ema_warmup: whether to warm the EMA decay up.
        sampler: default sampler name for :meth:`sample` (``ddpm``, ``ddim``, ``dpmpp``).
        num_inference_steps: default number of sampler steps (NFE for ddpm/ddim).

    Raises:
        ValueError: for a ``beta_schedule``, ``prediction_type`` or ``sampler`` outside the allowed values.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        prediction_type: str = "epsilon",
        min_snr_gamma: float | None = None,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        sampler: str = "ddim",
        num_inference_steps: int = 50,
    ) -> None:
        super().__init__()
        _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("sampler", sampler, SAMPLERS)
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"model.min_snr_gamma must be > 0 or null, got {min_snr_gamma}")
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"], logger=False)
        self.net = net
        self.ema = make_ema(net, ema_decay, ema_warmup)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
        )
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.float()
        self.register_buffer("snr", alphas_cumprod / (1 - alphas_cumprod), persistent=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images this model generates."""
        cfg = self.net.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    # ----------------------------------------------------------------- training
    def diffusion_loss(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-batch diffusion loss for clean images ``x0`` ``(B, C, H, W)`` in ``[-1, 1]``; returns a scalar."""
        b = x0.shape[0]
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = torch.randint(0, self.hparams.num_train_timesteps, (b,), device="cpu", generator=generator)
        t = t.to(x0.device)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        pred = self.net(x_t, t).sample
        kind = self.hparams.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = x0
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.hparams.min_snr_gamma is not None:
            per_sample = per_sample * min_snr_weight(self.snr[t], self.hparams.min_snr_gamma, kind)
        return per_sample.mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x0 = _images(batch)
        loss = self.diffusion_loss(x0)
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.ema.update_parameters(self.net)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # Fixed noise and timesteps per batch, so val/loss is comparable between evaluations.
        x0 = _images(batch)
        generator = torch.Generator().manual_seed(batch_idx)
        loss = self.diffusion_loss(x0, generator=generator)
        self.log("val/loss", loss, prog_bar=True, batch_size=x0.shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        return optimizers_config(self.trainer, self.net.parameters(), self.optimizer_factory, self.lr_scheduler_factory)

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        num_inference_steps: int | None = None,
        eta: float = 0.0,
        batch_size: int = 256,
        use_ema: bool = True,
    ) -> torch.Tensor:
        """Draw ``n`` images by reverse diffusion.

        Args:
            n: number of images.
            generator: CPU ``torch.Generator`` for the initial noise (and ancestral noise); same seed, same images.
            sampler: ``ddpm`` (ancestral, NFE = steps), ``ddim`` or ``dpmpp``; defaults to ``hparams.sampler``.
            num_inference_steps: sampler steps (NFE); defaults to ``hparams.num_inference_steps``.
            eta: DDIM stochasticity (0 = deterministic); ignored by other samplers.
            batch_size: images per network call.
            use_ema: sample with the EMA weights (default) or the raw training weights.

        Returns:
            ``(n, C, H, W)`` float32 tensor in ``[-1, 1]`` on this module's device.

        Raises:
            ValueError: for an unknown sampler (the message lists the allowed names).
        """
        sampler = sampler or self.hparams.sampler
        steps = num_inference_steps or self.hparams.num_inference_steps
        scheduler = make_scheduler(sampler, self.noise_scheduler.config)
        net = self.ema.module if use_ema else self.net
        was_training = net.training
        net.eval()
        out = []
        try:
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                scheduler.set_timesteps(steps, device=self.device)
                x = randn_tensor((b, *self.image_shape), generator=generator, device=self.device)
                x = x * scheduler.init_noise_sigma
                extra = {"eta": eta} if sampler == "ddim" else {}
                for t in scheduler.timesteps:
                    model_in = scheduler.scale_model_input(x, t)
                    eps = net(model_in, t.expand(b)).sample
                    x = scheduler.step(eps, t, x, generator=generator, **extra).prev_sample
                out.append(x.clamp(-1, 1).float())
        finally:
            net.train(was_training)
        return torch.cat(out)

    def save_pretrained(self, path: str | Path) -> Path:
        """Save the EMA network and the noise schedule as a diffusers ``DDPMPipeline`` directory.

        ``DDPMPipeline.from_pretrained(path)`` loads it. Raises ``TypeError`` if the network is no ``UNet2DModel``.
        """
        if not isinstance(self.ema.module, UNet2DModel):
            raise TypeError(f"save_pretrained needs a diffusers UNet2DModel, got {type(self.ema.module).__name__}")
        pipeline = DDPMPipeline(unet=self.ema.module, scheduler=DDPMScheduler.from_config(self.noise_scheduler.config))
        pipeline.save_pretrained(str(path))
        return Path(path)


def _images(batch: Any) -> torch.Tensor:
    """Images ``(B, C, H, W)`` from a batch that is a tensor or an ``(images, labels)`` pair."""
    return batch[0] if isinstance(batch, list | tuple) else batch
