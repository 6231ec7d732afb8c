"""Variational autoencoder (Kingma & Welling 2014) with β-weighted KL (Higgins et al. 2017) and KL warm-up."""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningModule
from torch import nn

from atelier.losses.vae import LIKELIHOODS, gaussian_kl, kl_weight, reconstruction_nll
from atelier.models.optim import OptimizerFactory, SchedulerFactory, optimizers_config
from atelier.sampling.latents import interpolation_path


class VAE(LightningModule):
    """VAE trained on the negative ELBO ``E_q[-log p(x|z)] + β_t · KL(q(z|x) ‖ N(0, I))`` (Kingma & Welling
    2014, Eq. 10; β from Higgins et al. 2017; ``β_t`` ramps linearly from 0 to β over ``kl_warmup_steps``).

    Logged (nats per image): ``train/rec``, ``train/kl``, ``train/elbo`` (= -(rec + KL), the true ELBO whatever
    β), ``train/loss`` (the weighted objective), ``train/kl_weight``; ``val/rec``, ``val/kl``, ``val/elbo`` and
    ``val/loss`` = -ELBO (β = 1, no warm-up, so it is comparable between runs).

    Args:
        encoder: ``(B, C, H, W)`` images in ``[-1, 1]`` → ``(μ, log σ²)``, each ``(B, latent_dim)``; exposes
            no attributes beyond that.
        decoder: ``(B, latent_dim)`` → ``(B, C, H, W)``: logits (``bernoulli``) or the mean (``gaussian``).
        optimizer: partial optimiser for both networks.
        lr_scheduler: optional partial (``diffusers.optimization.get_scheduler``), stepped every step.
        latent_dim: size of ``z``.
        likelihood: ``bernoulli`` (BCE, for near-binary images such as MNIST) or ``gaussian`` (MSE, fixed σ).
        sigma: σ of the Gaussian likelihood in ``[-1, 1]`` pixel units.
        beta: KL weight β (1 = the ELBO).
        kl_warmup_steps: optimiser steps of the linear KL warm-up (0: none).
        interpolation_steps: images per row of the interpolation grid.

    Raises:
        ValueError: for an unknown ``likelihood``, ``beta < 0`` or ``kl_warmup_steps < 0``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        latent_dim: int = 16,
        likelihood: str = "bernoulli",
        sigma: float = 0.1,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        interpolation_steps: int = 8,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"model.likelihood={likelihood!r} is not allowed; choose one of {list(LIKELIHOODS)}")
        if beta < 0:
            raise ValueError(f"model.beta must be >= 0, got {beta}")
        if kl_warmup_steps < 0:
            raise ValueError(f"model.kl_warmup_steps must be >= 0, got {kl_warmup_steps}")
        self.save_hyperparameters(ignore=["encoder", "decoder", "optimizer", "lr_scheduler"], logger=False)
        self.encoder = encoder
        self.decoder = decoder
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

    # ----------------------------------------------------------------- model
    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of ``p(x | z)`` for latents ``(B, latent_dim)`` as images ``(B, C, H, W)`` in ``[-1, 1]``."""
        out = self.decoder(z).float()
        return torch.sigmoid(out) * 2 - 1 if self.hparams.likelihood == "bernoulli" else out.clamp(-1, 1)

    def terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image ``(rec, kl, decoded)``: NLL and KL in nats ``(B,)`` (one reparameterised z per image) and the
        decoder output ``(B, C, H, W)``."""
        mu, logvar = self.encoder(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        decoded = self.decoder(z)
        rec = reconstruction_nll(decoded, x, self.hparams.likelihood, self.hparams.sigma)
        return rec, gaussian_kl(mu, logvar), decoded

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        rec, kl = (t.mean() for t in self.terms(x)[:2])
        if stage == "train":
            weight = kl_weight(self.global_step, self.hparams.beta, self.hparams.kl_warmup_steps)
            loss = rec + weight * kl
            self.log("train/kl_weight", weight, batch_size=x.shape[0])
        else:
            loss = rec + kl
        sync = stage != "train"
        self.log_dict({f"{stage}/rec": rec, f"{stage}/kl": kl, f"{stage}/elbo": -(rec + kl)},
                      batch_size=x.shape[0], sync_dist=sync)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=x.shape[0], sync_dist=sync)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # fixed reparameterisation noise per batch, so val/loss is comparable between evaluations
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_idx)
            return self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        params = list(self.encoder.parameters()) + list(self.decoder.parameters())
        return optimizers_config(self.trainer, params, self.optimizer_factory, self.lr_scheduler_factory)

    # ----------------------------------------------------------------- sampling
    def _decode_batches(self, z: torch.Tensor, batch_size: int) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self.decode_mean(z[i:i + batch_size]) for i in range(0, len(z), batch_size)])
        finally:
            self.train(was_training)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, batch_size: int = 256) -> torch.Tensor:
        """Decode ``n`` latents from the prior ``N(0, I)`` (drawn on the CPU from ``generator``).

        Returns:
            ``(n, C, H, W)`` float32 in ``[-1, 1]``: the decoder mean (not a noisy draw from ``p(x|z)``).
        """
        z = torch.randn((n, self.hparams.latent_dim), generator=generator).to(self.device)
        return self._decode_batches(z, batch_size)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder mean at the posterior mean ``μ(x)`` for images ``(B, C, H, W)`` in ``[-1, 1]``."""
        was_training = self.training
        self.eval()
        try:
            return self.decode_mean(self.encoder(x.to(self.device))[0])
        finally:
            self.train(was_training)

    @torch.no_grad()
    def visualizations(self, generator: torch.Generator | None, images: torch.Tensor | None = None
                       ) -> dict[str, tuple[torch.Tensor, int]]:
        """Extra grids: ``reconstruction`` (rows alternate 8 inputs and their reconstructions) and
        ``interpolation`` (linear paths between the posterior means of pairs of inputs; prior latents when no
        images are given)."""
        steps = self.hparams.interpolation_steps
        if images is None or len(images) < 2:
            z = torch.randn((16, self.hparams.latent_dim), generator=generator).to(self.device)
            z0, z1 = z[:8], z[8:]
            grids: dict[str, tuple[torch.Tensor, int]] = {}
        else:
            x = images[:16].to(self.device)
            rec = self.reconstruct(x)
            per_row = min(8, len(x))
            grids = {"reconstruction": (_interleave_rows(x, rec, per_row), per_row)}
            was_training = self.training
            self.eval()
            mu = self.encoder(x)[0]
            self.train(was_training)
            half = len(mu) // 2
            z0, z1 = mu[:half], mu[half:2 * half]
        path = interpolation_path(z0, z1, steps, spherical=False)
        grids["interpolation"] = (self._decode_batches(path, 256), steps)
        return grids


def _interleave_rows(x: torch.Tensor, rec: torch.Tensor, per_row: int) -> torch.Tensor:
    """Rows of ``per_row`` inputs followed by a row of their reconstructions: ``(2 · ⌊B/per_row⌋ · per_row, …)``."""
    rows = len(x) // per_row
    x, rec = x[: rows * per_row], rec[: rows * per_row]
    return torch.stack([x.view(rows, per_row, *x.shape[1:]), rec.view(rows, per_row, *rec.shape[1:])], 1).flatten(0, 2)
