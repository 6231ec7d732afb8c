"""Convolutional VAE encoder and decoder sized from the image size (power of two ≥ 8)."""

from __future__ import annotations

import torch
from torch import nn

from atelier.nets.gan import num_upsamplings


class ConvEncoder(nn.Module):
    """``(B, C, S, S)`` images → posterior parameters ``(μ, log σ²)``, each ``(B, latent_dim)``.

    Stride-2 4×4 convs (BatchNorm + LeakyReLU) halve the side down to 4×4, doubling channels from
    ``base_channels``; a linear layer gives ``2 · latent_dim`` outputs.
    """

    def __init__(self, image_size: int = 32, channels: int = 1, latent_dim: int = 16,
                 base_channels: int = 32) -> None:
        super().__init__()
        n = num_upsamplings(image_size)
        layers: list[nn.Module] = []
        cin, ch = channels, base_channels
        for _ in range(n):
            layers += [nn.Conv2d(cin, ch, 4, 2, 1), nn.BatchNorm2d(ch), nn.LeakyReLU(0.2, True)]
            cin, ch = ch, ch * 2
        self.main = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(cin * 16, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.main(x)).chunk(2, dim=1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """Latents ``(B, latent_dim)`` → ``(B, C, S, S)`` decoder output (logits for a Bernoulli likelihood, the mean
    for a Gaussian one), mirroring :class:`ConvEncoder` with transposed convs."""

    def __init__(self, image_size: int = 32, channels: int = 1, latent_dim: int = 16,
                 base_channels: int = 32) -> None:
        super().__init__()
        n = num_upsamplings(image_size)
        self.ch = base_channels * 2 ** (n - 1)
        self.linear = nn.Linear(latent_dim, self.ch * 16)
        layers: list[nn.Module] = [nn.BatchNorm2d(self.ch), nn.ReLU(True)]
        ch = self.ch
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers.append(nn.ConvTranspose2d(ch, channels, 4, 2, 1))
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(self.linear(z).view(-1, self.ch, 4, 4))
