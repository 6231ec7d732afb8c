"""Variational autoencoder (Kingma & Welling 2014) with β-weighted KL (Higgins et al. 2017), KL warm-up and an
ex-post Gaussian-mixture sampling prior (Ghosh et al. 2020, Sec. 4)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from lightning import LightningModule
from torch import nn

from atelier.data.loaders import make_loader
from atelier.losses.vae import LIKELIHOODS, gaussian_kl, kl_weight, reconstruction_nll
from atelier.models.latent_prior import (
    GaussianMixturePrior,
    MixtureFit,
    check_prior_name,
    fit_gaussian_mixture,
    posterior_means,
)
from atelier.models.optim import OptimizerFactory, SchedulerFactory, optimizers_config
from atelier.sampling.latents import interpolation_path

log = logging.getLogger(__name__)


class VAE(LightningModule):
    """VAE trained on the negative ELBO ``E_q[-log p(x|z)] + β_t · KL(q(z|x) ‖ N(0, I))`` (Kingma & Welling
    2014, Eq. 10; β from Higgins et al. 2017; ``β_t`` ramps linearly from 0 to β over ``kl_warmup_steps``).

    Logged (nats per image): ``train/rec``, ``train/kl``, ``train/elbo`` (= -(rec + KL), the true ELBO whatever
    β), ``train/loss`` (the weighted objective), ``train/kl_weight``; ``val/rec``, ``val/kl``, ``val/elbo`` and
    ``val/loss`` = -ELBO (β = 1, no warm-up, so it is comparable between runs).

    Sampling prior (``sampling_prior``; docs/vae_prior.md): ``standard`` decodes ``z ~ N(0, I)``; ``gmm``
    decodes ``z`` from a ``gmm_components``-component full-covariance Gaussian mixture fitted *after training*
    to the posterior means ``μ(x)`` of the training set (Ghosh et al. 2020, "From variational to deterministic
    autoencoders", Sec. 4, ex-post density estimation), so samples come from where the data is rather than from
    prior regions the decoder never learned. With ``gmm`` the mixture is fitted (scikit-learn) at the end of the
    last training epoch, before the callbacks' ``on_train_end`` (Lightning calls those before the module's, and
    the final sample grid must come from the mixture), and stored as buffers ``prior.weights`` ``(k,)``,
    ``prior.means`` ``(k, d)``, ``prior.scale_tril`` ``(k, d, d)``; it logs ``train/prior_loglik`` (mean
    ``log p(μ)`` in nats under the mixture) and ``train/prior_loglik_standard`` (under ``N(0, I)``). Until a
    mixture is fitted (during training, an old checkpoint: ``scripts/fit_vae_prior.py`` upgrades one), ``gmm``
    falls back to ``N(0, I)`` with a one-time warning.

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
        sampling_prior: ``gmm`` (the fitted mixture, ``N(0, I)`` until there is one) or ``standard``
            (``N(0, I)``, the behaviour before the mixture existed; no mixture is fitted).
        gmm_components: ``k``, components of the mixture.
        gmm_max_samples: at most this many training images are encoded for the fit.
        gmm_reg_covar: added to the diagonal of each covariance (scikit-learn's ``reg_covar``).
        gmm_seed: ``random_state`` of the fit's k-means initialisation.

    Raises:
        ValueError: for an unknown ``likelihood`` or ``sampling_prior`` (listing the allowed values),
            ``beta < 0``, ``kl_warmup_steps < 0``, ``gmm_components < 1``, ``gmm_max_samples < 1`` or
            ``gmm_reg_covar < 0``.
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
        sampling_prior: str = "gmm",
        gmm_components: int = 10,
        gmm_max_samples: int = 60000,
        gmm_reg_covar: float = 1e-4,
        gmm_seed: int = 0,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"model.likelihood={likelihood!r} is not allowed; choose one of {list(LIKELIHOODS)}")
        if beta < 0:
            raise ValueError(f"model.beta must be >= 0, got {beta}")
        if kl_warmup_steps < 0:
            raise ValueError(f"model.kl_warmup_steps must be >= 0, got {kl_warmup_steps}")
        check_prior_name(sampling_prior)
        if gmm_max_samples < 1:
            raise ValueError(f"model.gmm_max_samples must be >= 1, got {gmm_max_samples}")
        if gmm_reg_covar < 0:
            raise ValueError(f"model.gmm_reg_covar must be >= 0, got {gmm_reg_covar}")
        self.save_hyperparameters(ignore=["encoder", "decoder", "optimizer", "lr_scheduler"], logger=False)
        self.encoder = encoder
        self.decoder = decoder
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.prior = GaussianMixturePrior(latent_dim, gmm_components)
        self._prior_fit_step: int | None = None  # global step of the last fit in this process
        self._warned_unfitted = False

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
    def prior_latents(self, n: int, generator: torch.Generator | None = None,
                      sampling_prior: str | None = None) -> torch.Tensor:
        """``n`` latents ``(n, latent_dim)`` float32 on the CPU from ``sampling_prior`` (default: the model's
        ``sampling_prior``), drawn from ``generator``: ``standard`` is ``torch.randn`` (the images of the VAE
        before the mixture existed); ``gmm`` draws the component with ``torch.multinomial`` and
        ``z = mean + L ε`` (:meth:`GaussianMixturePrior.sample`), or ``N(0, I)`` with a one-time warning while no
        mixture is fitted.

        Raises:
            ValueError: for an unknown ``sampling_prior`` (listing the allowed values).
        """
        prior = check_prior_name(sampling_prior or self.hparams.sampling_prior)
        if prior == "gmm":
            if self.prior.fitted:
                return self.prior.sample(n, generator)
            if not self._warned_unfitted:
                self._warned_unfitted = True
                log.warning("VAE: sampling_prior=gmm but no Gaussian mixture is fitted yet (it is fitted at the end "
                            "of training; for an existing checkpoint run scripts/fit_vae_prior.py): sampling from "
                            "N(0, I) instead")
        return torch.randn((n, self.hparams.latent_dim), generator=generator)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, batch_size: int = 256,
               sampling_prior: str | None = None) -> torch.Tensor:
        """Decode ``n`` latents from the sampling prior (:meth:`prior_latents`; ``sampling_prior`` overrides
        the model's ``gmm`` | ``standard`` for this call), drawn on the CPU from ``generator``: the same seed
        gives the same images.

        Returns:
            ``(n, C, H, W)`` float32 in ``[-1, 1]``: the decoder mean (not a noisy draw from ``p(x|z)``).

        Raises:
            ValueError: for an unknown ``sampling_prior`` (listing the allowed values).
        """
        z = self.prior_latents(n, generator, sampling_prior).to(self.device)
        return self._decode_batches(z, batch_size)

    # ----------------------------------------------------------------- ex-post prior (Ghosh et al. 2020, Sec. 4)
    def fit_prior(self, batches: Iterable[Any], components: int | None = None, max_samples: int | None = None,
                  max_batches: int | None = None) -> MixtureFit:
        """Fit the Gaussian mixture to the posterior means ``μ(x)`` of the images in ``batches`` (``(B, C, H, W)``
        in ``[-1, 1]`` or ``(images, labels)``; the training set, unshuffled and unaugmented where possible)
        and store it in :attr:`prior`. The encoder runs in eval mode; the global RNG states are left untouched.

        Args:
            batches: e.g. a DataLoader over the training set.
            components: ``k`` (default ``gmm_components``).
            max_samples: images encoded at most (default ``gmm_max_samples``).
            max_batches: batches read at most (default: all).

        Returns:
            The :class:`MixtureFit` (its ``mean_log_likelihood`` is also logged).

        Raises:
            ValueError: for ``components < 1``, when ``batches`` yields no image or the latents are not finite.
        """
        hp = self.hparams
        with torch.random.fork_rng(devices=[]):  # a loader's iterator draws its seed from the global RNG
            mu = posterior_means(self.encoder, batches, max_samples or hp.gmm_max_samples, max_batches, self.device)
        fit = fit_gaussian_mixture(mu, components or hp.gmm_components, hp.gmm_reg_covar, hp.gmm_seed)
        self.prior.set_mixture(fit.weights, fit.means, fit.scale_tril)
        self._warned_unfitted = False
        log.info("VAE prior: %d-component Gaussian mixture fitted to %d posterior means; mean log-likelihood "
                 "%.3f nats (N(0, I): %.3f)%s", len(fit.weights), fit.num_samples, fit.mean_log_likelihood,
                 fit.standard_log_likelihood, "" if fit.converged else "; EM did not converge")
        return fit

    def prior_batches(self) -> Iterable[Any]:
        """What :meth:`fit_prior` reads at the end of training: the datamodule's training set through an
        unshuffled loader (its batch size and workers) when it exposes ``train_set``, else its (or the
        trainer's) training loader. Augmentations in the training set's own transform (e.g. ``hflip`` of the
        art datamodule) stay on."""
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_set", None)
        if dataset is not None:
            hp = getattr(datamodule, "hparams", {})
            return make_loader(dataset, int(hp.get("batch_size", 256)), shuffle=False,
                               num_workers=int(hp.get("num_workers", 0)))
        if datamodule is not None:
            return datamodule.train_dataloader()
        return trainer.train_dataloader

    def _fit_prior_at_end_of_training(self) -> MixtureFit | None:
        trainer = self.trainer
        limit = trainer.limit_train_batches  # an int (batches) or a fraction; fast_dev_run sets 1 (one batch)
        limited = isinstance(limit, int) or (isinstance(limit, float) and limit < 1.0)
        batches = trainer.num_training_batches
        # a debug/test run with limited batches encodes no more than it trained on
        max_batches = int(batches) if limited and batches != float("inf") else None
        self._prior_fit_step = trainer.global_step
        try:
            return self.fit_prior(self.prior_batches(), max_batches=max_batches)
        except ValueError as err:  # e.g. a diverged encoder (NaN means): keep the run and its checkpoints
            log.error("VAE prior: no Gaussian mixture fitted (%s); sampling_prior=gmm will use N(0, I)", err)
            return None

    def on_train_start(self) -> None:
        # a mixture loaded with a checkpoint describes older weights: refitted at the end of this run
        if self.prior.fitted:
            log.info("VAE prior: the Gaussian mixture of the checkpoint is dropped and refitted at the end of training")
            self.prior.reset()
        self._prior_fit_step = None

    def on_train_epoch_end(self) -> None:
        # Lightning runs every callback's on_train_end before the module's: fitting here, at the end of the last
        # epoch, lets the final sample grid (SampleGrid.on_train_end) and the epoch-end checkpoints use the mixture
        if self.hparams.sampling_prior != "gmm" or not _training_ends_after_this_epoch(self.trainer):
            return
        fit = self._fit_prior_at_end_of_training()
        if fit is not None:
            self.log_dict({"train/prior_loglik": fit.mean_log_likelihood,
                           "train/prior_loglik_standard": fit.standard_log_likelihood})

    def on_train_end(self) -> None:
        # the stop was not foreseen at the last epoch end (e.g. early stopping decided after it): fit now, so the
        # checkpoint saved after training holds the mixture (the final grid was drawn before, from N(0, I))
        if self.hparams.sampling_prior != "gmm" or self._prior_fit_step == self.trainer.global_step:
            return
        log.warning("VAE prior: training stopped after the last epoch-end hook; fitting the mixture now, after the "
                    "final sample grid was drawn")
        fit = self._fit_prior_at_end_of_training()
        for logger in self.loggers if fit is not None else []:
            logger.log_metrics({"train/prior_loglik": fit.mean_log_likelihood,
                                "train/prior_loglik_standard": fit.standard_log_likelihood}, step=self.global_step)

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
            z = self.prior_latents(16, generator).to(self.device)
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


def _training_ends_after_this_epoch(trainer: Any) -> bool:
    """Whether the fit loop stops after the epoch whose ``on_train_epoch_end`` is running: ``max_steps`` or
    ``max_epochs`` reached, or ``should_stop`` (``max_time``, a stop signal) once ``min_steps``/``min_epochs`` are
    met (mirrors ``lightning.pytorch.loops.fit_loop._FitLoop.done``)."""
    loop = trainer.fit_loop
    epochs_done = loop.epoch_progress.current.processed  # already counts this epoch
    max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
    if max_steps is not None and max_steps != -1 and trainer.global_step >= max_steps:
        return True
    if max_epochs is not None and max_epochs != -1 and epochs_done >= max_epochs:
        return True
    return bool(trainer.should_stop and epochs_done >= (loop.min_epochs or 0)
                and trainer.global_step >= (loop.min_steps or 0))


def _interleave_rows(x: torch.Tensor, rec: torch.Tensor, per_row: int) -> torch.Tensor:
    """Rows of ``per_row`` inputs followed by a row of their reconstructions: ``(2 · ⌊B/per_row⌋ · per_row, …)``."""
    rows = len(x) // per_row
    x, rec = x[: rows * per_row], rec[: rows * per_row]
    return torch.stack([x.view(rows, per_row, *x.shape[1:]), rec.view(rows, per_row, *rec.shape[1:])], 1).flatten(0, 2)
