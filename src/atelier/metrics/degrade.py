"""Graded image degradations for checking that a feature extractor's FID/KID track what a person sees.

Each function maps images ``(B, C, H, W)`` float in ``[0, 1]`` to degraded images of the same shape and range;
``level`` grows with the strength. Used by ``scripts/validate_features.py`` (real vs degraded real, as in
Heusel et al. 2017, Fig. 1, where FID grows with blur, noise, swirl and salt-and-pepper).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms.v2 import functional as TF


def blur(images: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian blur with standard deviation ``sigma`` px (kernel ``2·ceil(3σ)+1``)."""
    k = 2 * int(torch.tensor(3 * sigma).ceil()) + 1
    return TF.gaussian_blur(images, kernel_size=[k, k], sigma=[sigma, sigma])


def noise(images: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Additive Gaussian noise of standard deviation ``sigma`` (in ``[0, 1]`` units), clamped."""
    return (images + sigma * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def colour_shift(images: torch.Tensor, hue: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hue rotated by ``hue`` turns (``0.5`` = half the colour wheel; Smith 1978 HSV), saturation kept."""
    return TF.adjust_hue(images, hue).clamp(0, 1)


def shuffle_patches(images: torch.Tensor, patch: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image cut into ``patch × patch`` px tiles that are put back in a random order (smaller: stronger).

    Raises:
        ValueError: when ``patch`` does not divide the image side.
    """
    p = int(patch)
    b, c, h, w = images.shape
    if h % p or w % p:
        raise ValueError(f"patch={p} px must divide the image size {h}×{w}")
    gh, gw = h // p, w // p
    tiles = images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, p, p)
    order = torch.stack([torch.randperm(gh * gw, generator=generator) for _ in range(b)])
    tiles = tiles[torch.arange(b)[:, None], order]
    return tiles.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


#: name → (function, levels from mild to strong)
DEGRADATIONS: dict[str, tuple[Callable[..., torch.Tensor], tuple[float, ...]]] = {
    "blur": (blur, (0.5, 1.0, 2.0)),
    "noise": (noise, (0.05, 0.1, 0.2)),
    "colour_shift": (colour_shift, (0.05, 0.15, 0.3)),
    "shuffled_patches": (shuffle_patches, (32, 16, 8)),
}
