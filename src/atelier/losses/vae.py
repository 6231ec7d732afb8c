"""Terms of the VAE's evidence lower bound (ELBO), in nats per image."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LIKELIHOODS = ("bernoulli", "gaussian")


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(μ, diag σ²) ‖ N(0, I))`` per sample, in nats (Kingma & Welling 2014, Appendix B):
    ``-½ Σ (1 + log σ² - μ² - σ²)``.

    Args:
        mu: ``(B, D)`` posterior means.
        logvar: ``(B, D)`` posterior log-variances ``log σ²``.

    Returns:
        ``(B,)`` float32, ≥ 0.
    """
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(1)


def reconstruction_nll(
    decoded: torch.Tensor, x: torch.Tensor, likelihood: str, sigma: float = 0.1
) -> torch.Tensor:
    """Negative log-likelihood ``-log p(x | z)`` per image, in nats.

    Args:
        decoded: ``(B, C, H, W)`` decoder output: logits for ``bernoulli``, the mean in ``[-1, 1]`` units for
            ``gaussian``.
        x: ``(B, C, H, W)`` images in ``[-1, 1]``; the Bernoulli likelihood reads them as probabilities
            ``(x + 1) / 2`` (binary cross-entropy, exact for binarised data).
        likelihood: ``bernoulli`` (BCE) or ``gaussian`` (MSE with a fixed ``sigma``:
            ``Σ [(x - μ)² / 2σ² + log σ + ½ log 2π]``).
        sigma: standard deviation of the Gaussian likelihood, in ``[-1, 1]`` pixel units.

    Returns:
        ``(B,)`` float32.

    Raises:
        ValueError: for an unknown ``likelihood`` (naming ``model.likelihood``).
    """
    decoded, x = decoded.float(), x.float()
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(decoded, (x + 1) / 2, reduction="none")
    elif likelihood == "gaussian":
        nll = (x - decoded).pow(2) / (2 * sigma**2) + math.log(sigma) + 0.5 * math.log(2 * math.pi)
    else:
        raise ValueError(f"model.likelihood={likelihood!r} is not allowed; choose one of {list(LIKELIHOODS)}")
    return nll.flatten(1).sum(1)


def kl_weight(step: int, beta: float, warmup_steps: int) -> float:
    """β times a linear KL warm-up from 0 to 1 over ``warmup_steps`` optimiser steps (Bowman et al. 2016;
    Sønderby et al. 2016); ``warmup_steps = 0`` gives ``β`` from the start."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)
