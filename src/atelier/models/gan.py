"""Generative adversarial network (Goodfellow et al. 2014) as a LightningModule with manual optimisation."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning import LightningModule
from torch import nn

from atelier.augment.diffaugment import diff_augment, parse_policy
from atelier.losses.gan import check_loss, discriminator_loss, generator_loss, gradient_penalty, r1_penalty
from atelier.models.ema import make_ema
from atelier.models.optim import OptimizerFactory, SchedulerFactory, build_scheduler, make_optimizer
from atelier.sampling.guidance import conditioning_labels
from atelier.sampling.latents import interpolation_path


class GAN(LightningModule):
    """GAN training with one discriminator (critic) step per batch and a generator step every ``n_critic``
    batches, both with their own optimiser (two time-scale update rule, Heusel et al. 2017), an EMA of the
    generator (Yazıcı et al. 2019) used for all sampling, and optional DiffAugment, WGAN-GP and R1.

    Args:
        generator: maps ``(z (B, z_dim), labels (B,) | None)`` to ``(B, C, H, W)`` in ``[-1, 1]``; must expose
            ``z_dim`` and ``num_classes`` (``None`` when unconditional), e.g. :class:`atelier.nets.gan.DCGANGenerator`.
        discriminator: maps ``(images, labels | None)`` to scores ``(B,)``.
        optimizer_g: partial optimiser for the generator (e.g. ``Adam(lr=2e-4, betas=(0.5, 0.999))``).
        optimizer_d: partial optimiser for the discriminator.
        lr_scheduler: optional partial LR schedule (e.g. ``diffusers.optimization.get_scheduler`` with
            ``name=cosine``), one instance per optimiser, both indexed by ``trainer.global_step`` (G + D steps):
            over ``max_steps`` (or the epochs' batches × ``1 + 1/n_critic``), or following a time budget's
            horizon, so that both LRs end together at the last step. ``None``: constant LRs.
        loss: ``non_saturating``, ``hinge`` or ``wgan_gp`` (see :mod:`atelier.losses.gan`).
        n_critic: discriminator steps per generator step (5 for WGAN-GP in Gulrajani et al. 2017).
        gp_weight: λ of the WGAN-GP gradient penalty (used with ``loss=wgan_gp``).
        r1_gamma: γ of the R1 penalty ``γ/2 · E‖∇D(x)‖²`` on reals (0 disables).
        r1_interval: lazy regularisation (Karras et al. 2020): R1 every this many D steps, scaled by it.
        diffaugment: DiffAugment policy such as ``"color,translation,cutout"`` (``None``/empty: off).
        ema_decay: maximum decay of the generator EMA; ``ema_warmup`` ramps it up as ``(1 + n) / (10 + n)``.
        ema_warmup: whether to warm the EMA decay up.
        interpolation_rows: rows (pairs of latents) of the latent-interpolation grid; each row has
            ``interpolation_steps`` images.
        interpolation_steps: images per interpolation row.
        channels_last: train G, D and the EMA generator in channels-last (NHWC) memory format, with real batches
            converted to it (:meth:`configure_model`). The same arithmetic in another layout: on a 2-core Zen 4
            in bf16 it trained the quick art GAN's nets ~1.1× faster (``scripts/bench_gan.py`` measures it on the
            machine at hand). Checkpoints are unchanged.

    Raises:
        ValueError: for an unknown ``loss`` or DiffAugment policy, ``n_critic < 1``, ``r1_interval < 1``, or a
            generator and discriminator that disagree on ``num_classes``.

    Note:
        Lightning counts every ``optimizer.step()`` in ``trainer.global_step``, so with ``n_critic = 1`` a batch
        advances it by 2 (D + G): ``trainer.max_steps`` and every ``*_every_n_steps`` are in optimiser steps.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        optimizer_g: OptimizerFactory,
        optimizer_d: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        loss: str = "non_saturating",
        n_critic: int = 1,
        gp_weight: float = 10.0,
        r1_gamma: float = 0.0,
        r1_interval: int = 1,
        diffaugment: str | None = None,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        interpolation_rows: int = 8,
        interpolation_steps: int = 8,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        check_loss(loss)
        if n_critic < 1:
            raise ValueError(f"model.n_critic must be >= 1, got {n_critic}")
        if r1_interval < 1:
            raise ValueError(f"model.r1_interval must be >= 1, got {r1_interval}")
        self.policy = parse_policy(diffaugment)
        self.save_hyperparameters(ignore=["generator", "discriminator", "optimizer_g", "optimizer_d", "lr_scheduler"],
                                  logger=False)
        self.automatic_optimization = False
        self.generator = generator
        self.discriminator = discriminator
        self.num_classes: int | None = getattr(generator, "num_classes", None)
        d_classes = _projection_classes(discriminator)
        if d_classes != self.num_classes:
            raise ValueError(f"model.generator.num_classes={self.num_classes} but the discriminator is built for "
                             f"{d_classes}; set both to the same value (null for unconditional)")
        self.z_dim: int = generator.z_dim
        self.ema = make_ema(generator, ema_decay, ema_warmup)
        self.optimizer_g_factory = optimizer_g
        self.optimizer_d_factory = optimizer_d
        self.lr_scheduler_factory = lr_scheduler
        # discriminator steps so far; a buffer, so it is in checkpoints and n_critic / lazy R1 resume exactly
        self.register_buffer("d_steps", torch.zeros((), dtype=torch.long))

    def configure_model(self) -> None:
        """Put G, D and the EMA generator in channels-last memory format when ``channels_last`` (Lightning calls
        this before the optimisers are built and a checkpoint is restored; loading copies into that layout)."""
        if self.hparams.get("channels_last", False):
            for net in (self.generator, self.discriminator, self.ema.module):
                net.to(memory_format=torch.channels_last)

    # ----------------------------------------------------------------- helpers
    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """DiffAugment ``(B, C, H, W)`` images with the configured policy (identity when off)."""
        return diff_augment(x, self.policy) if self.policy else x

    def _labels(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(batch, list | tuple):
            x, y = batch[0], batch[1] if len(batch) > 1 else None
        else:
            x, y = batch, None
        if self.num_classes is None:
            return x, None
        if y is None:
            raise ValueError("a class-conditional GAN needs (image, label) batches from the datamodule")
        return x, y

    def _latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((n, self.z_dim), generator=generator).to(self.device)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, labels = self._labels(batch)
        if self.hparams.get("channels_last", False):
            real = real.contiguous(memory_format=torch.channels_last)
        b = real.shape[0]
        opt_g, opt_d = self.optimizers()
        hp = self.hparams

        # discriminator / critic step
        self.toggle_optimizer(opt_d)
        with torch.no_grad():
            fake = self.generator(self._latents(b), labels)
        do_r1 = hp.r1_gamma > 0 and int(self.d_steps) % hp.r1_interval == 0
        real_in = real.detach().requires_grad_(do_r1)
        d_real = self.discriminator(self.augment(real_in), labels)
        d_fake = self.discriminator(self.augment(fake), labels)
        loss_d = discriminator_loss(hp.loss, d_real, d_fake)
        logs = {"train/d_loss": loss_d.detach(), "train/d_real": d_real.detach().float().mean(),
                "train/d_fake": d_fake.detach().float().mean()}
        total_d = loss_d
        if hp.loss == "wgan_gp":
            gp = gradient_penalty(lambda v: self.discriminator(v, labels), real, fake)
            total_d = total_d + hp.gp_weight * gp
            logs["train/gp"] = gp.detach()
        if do_r1:
            r1 = r1_penalty(d_real, real_in)
            total_d = total_d + 0.5 * hp.r1_gamma * hp.r1_interval * r1
            logs["train/r1"] = r1.detach()
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(total_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        self.d_steps += 1

        # generator step
        if int(self.d_steps) % hp.n_critic == 0:
            self.toggle_optimizer(opt_g)
            g_labels = None if labels is None else torch.randint(0, self.num_classes, (b,), device=self.device)
            fake = self.generator(self._latents(b), g_labels)
            loss_g = generator_loss(hp.loss, self.discriminator(self.augment(fake), g_labels))
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(loss_g)
            opt_g.step()
            self.untoggle_optimizer(opt_g)
            self.ema.update_parameters(self.generator)
            logs["train/g_loss"] = loss_g.detach()
        self._step_schedulers()
        for key, value in logs.items():
            self.log(key, value, prog_bar=key in ("train/d_loss", "train/g_loss"), batch_size=b)

    def configure_optimizers(self) -> Any:
        optimizers = [make_optimizer(self.optimizer_g_factory, self.generator.parameters(), "model.optimizer_g"),
                      make_optimizer(self.optimizer_d_factory, self.discriminator.parameters(), "model.optimizer_d")]
        if self.lr_scheduler_factory is None:
            return optimizers
        trainer = self.trainer
        # Lightning counts batches here (manual optimisation); global_step advances 1 + 1/n_critic per batch
        total = trainer.estimated_stepping_batches * (1 + 1 / self.hparams.n_critic)
        if trainer.max_steps != -1:
            total = min(total, trainer.max_steps)
        schedulers = [{"scheduler": build_scheduler(trainer, opt, self.lr_scheduler_factory, total), "interval": "step",
                       "name": name}
                      for opt, name in zip(optimizers, ("lr_g", "lr_d"), strict=True)]
        return optimizers, schedulers

    def _step_schedulers(self) -> None:
        """Set both LRs to the schedule's value at ``trainer.global_step`` (manual optimisation: Lightning does
        not step schedulers). Indexing by the global step rather than by each optimiser's own step count keeps
        G and D on one clock, the clock of ``max_steps`` and of a time budget's horizon, also after a resume."""
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.last_epoch = self.trainer.global_step - 1
            with warnings.catch_warnings():  # G's schedule moves on D-only batches too (n_critic > 1): intended
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                scheduler.step()

    # ----------------------------------------------------------------- sampling
    def _generate(self, z: torch.Tensor, labels: torch.Tensor | None, batch_size: int, use_ema: bool) -> torch.Tensor:
        net = self.ema.module if use_ema else self.generator
        was_training = net.training
        net.eval()
        try:
            out = []
            for start in range(0, z.shape[0], batch_size):
                lab = None if labels is None else labels[start:start + batch_size]
                out.append(net(z[start:start + batch_size], lab).float().clamp(-1, 1))
        finally:
            net.train(was_training)
        return torch.cat(out)

    def _default_labels(self, n: int, labels: torch.Tensor | None) -> torch.Tensor | None:
        if self.num_classes is None:
            return None
        return conditioning_labels(n, labels, self.num_classes, self.device)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
               batch_size: int = 256, use_ema: bool = True) -> torch.Tensor:
        """Draw ``n`` images from ``z ~ N(0, I)`` (drawn on the CPU from ``generator``: same seed, same images).

        Args:
            n: number of images.
            generator: CPU ``torch.Generator`` for the latents.
            labels: ``(n,)`` int64 classes for a conditional GAN; default ``ceil(n / num_classes)`` consecutive
                images per class (one grid row per class). Ignored when unconditional.
            batch_size: images per generator call.
            use_ema: use the EMA generator (default) or the raw one; both in eval mode (BatchNorm running stats).

        Returns:
            ``(n, C, H, W)`` float32 in ``[-1, 1]`` on this module's device.

        Raises:
            ValueError: for a conditional GAN, ``labels`` of other than ``n`` entries or outside
                ``[0, num_classes)`` (:func:`atelier.sampling.guidance.conditioning_labels`).
        """
        return self._generate(self._latents(n, generator), self._default_labels(n, labels), batch_size, use_ema)

    @torch.no_grad()
    def interpolate(self, generator: torch.Generator | None = None, rows: int | None = None,
                    steps: int | None = None) -> torch.Tensor:
        """Latent interpolation grid: ``rows`` spherical paths between random latents (one class per row when
        conditional), ``steps`` images each; returns ``(rows · steps, C, H, W)`` in ``[-1, 1]``."""
        rows = rows or self.hparams.interpolation_rows
        steps = steps or self.hparams.interpolation_steps
        z = interpolation_path(self._latents(rows, generator), self._latents(rows, generator), steps)
        labels = None if self.num_classes is None else (torch.arange(rows) % self.num_classes).repeat_interleave(steps)
        return self._generate(z, self._default_labels(len(z), labels), 256, True)

    def visualizations(self, generator: torch.Generator | None, images: torch.Tensor | None = None
                       ) -> dict[str, tuple[torch.Tensor, int]]:
        """Extra grids for the sample-grid callback: ``{"interpolation": (images, nrow)}``."""
        return {"interpolation": (self.interpolate(generator), self.hparams.interpolation_steps)}


def _projection_classes(discriminator: nn.Module) -> int | None:
    head = getattr(discriminator, "head", None)
    embed = getattr(head, "embed", None)
    return None if embed is None else embed.num_embeddings
