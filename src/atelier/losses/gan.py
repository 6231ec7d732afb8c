"""Adversarial losses and discriminator penalties.

All losses take raw discriminator outputs (logits / critic scores) of shape ``(B,)`` or ``(B, 1)`` and return a
float scalar (the batch mean).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GAN_LOSSES = ("non_saturating", "hinge", "wgan_gp")


def check_loss(name: str) -> None:
    """Raise ``ValueError`` naming ``model.loss`` and the allowed values when ``name`` is unknown."""
    if name not in GAN_LOSSES:
        raise ValueError(f"model.loss={name!r} is not allowed; choose one of {list(GAN_LOSSES)}")


def discriminator_loss(name: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator (critic) loss for real scores ``real`` and fake scores ``fake``.

    - ``non_saturating``: ``softplus(-D(x)) + softplus(D(G(z)))``, the binary cross-entropy of the original GAN
      (Goodfellow et al. 2014, Eq. 1) written on logits.
    - ``hinge``: ``relu(1 - D(x)) + relu(1 + D(G(z)))`` (Lim & Ye 2017; Miyato et al. 2018, Eq. 16).
    - ``wgan_gp``: ``D(G(z)) - D(x)``, the Wasserstein critic loss (Gulrajani et al. 2017, Eq. 3 without the
      penalty, which :func:`gradient_penalty` adds).

    Raises:
        ValueError: for an unknown ``name``.
    """
    check_loss(name)
    real, fake = real.float().flatten(), fake.float().flatten()
    if name == "non_saturating":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if name == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    return fake.mean() - real.mean()


def generator_loss(name: str, fake: torch.Tensor) -> torch.Tensor:
    """Generator loss for the discriminator's scores ``fake`` of generated images.

    ``non_saturating``: ``softplus(-D(G(z)))`` = ``-log σ(D(G(z)))`` (Goodfellow et al. 2014, Sec. 3);
    ``hinge`` and ``wgan_gp``: ``-D(G(z))``.

    Raises:
        ValueError: for an unknown ``name``.
    """
    check_loss(name)
    fake = fake.float().flatten()
    if name == "non_saturating":
        return F.softplus(-fake).mean()
    return -fake.mean()


def _input_grad_sq_norm(scores: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(scores.sum(), inputs, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1)


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """WGAN-GP gradient penalty ``E[(‖∇D(x̂)‖₂ - 1)²]`` at random interpolates ``x̂ = εx + (1-ε)x̃``
    (Gulrajani et al. 2017, Eq. 3 and Algorithm 1), unweighted (multiply by λ, 10 in the paper).

    Args:
        critic: maps ``(B, C, H, W)`` images to ``(B,)`` or ``(B, 1)`` scores.
        real: ``(B, C, H, W)`` real images.
        fake: ``(B, C, H, W)`` generated images (detached or not; the penalty does not reach G).
        generator: CPU generator for ε ~ U[0, 1], one per sample.
    """
    eps = torch.rand((real.shape[0], 1, 1, 1), generator=generator).to(real)
    mix = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    norm = _input_grad_sq_norm(critic(mix), mix).add(1e-12).sqrt()
    return (norm - 1).pow(2).mean()


def r1_penalty(real_scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 penalty ``E[‖∇ₓD(x)‖²]`` on real data (Mescheder et al. 2018, Eq. 9), unweighted: the loss term is
    ``γ/2 · r1_penalty``.

    Args:
        real_scores: ``(B,)`` or ``(B, 1)`` scores ``D(real)``, computed from ``real`` with ``requires_grad``.
        real: ``(B, C, H, W)`` real images that required grad when ``real_scores`` was computed.
    """
    return _input_grad_sq_norm(real_scores, real).mean()
