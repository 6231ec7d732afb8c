"""Latent-space helpers shared by the GAN and the VAE: interpolation paths for interpolation grids."""

from __future__ import annotations

import torch


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985; White 2016 for GAN latents) between rows of ``z0`` and
    ``z1`` ``(B, D)`` at fractions ``t`` ``(T,)`` in ``[0, 1]``; returns ``(B, T, D)``. Falls back to linear
    interpolation for (nearly) parallel vectors."""
    a, b = z0[:, None, :], z1[:, None, :]
    t = t.to(z0)[None, :, None]
    cos = torch.nn.functional.cosine_similarity(z0, z1, dim=1).clamp(-1, 1)[:, None, None]
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    linear = (1 - t) * a + t * b
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / sin.clamp(min=1e-6)
    return torch.where(sin.abs() < 1e-4, linear, spherical)


def interpolation_path(z0: torch.Tensor, z1: torch.Tensor, steps: int, spherical: bool = True) -> torch.Tensor:
    """``steps`` evenly spaced latents from each row of ``z0`` to the same row of ``z1`` (both ``(B, D)``),
    flattened row-major to ``(B · steps, D)`` so that each grid row is one interpolation."""
    t = torch.linspace(0, 1, steps)
    if spherical:
        path = slerp(z0, z1, t)
    else:
        t = t.to(z0)[None, :, None]
        path = (1 - t) * z0[:, None] + t * z1[:, None]
    return path.reshape(-1, z0.shape[1])
