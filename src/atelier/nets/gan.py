"""Generators and discriminators sized from the image size: DCGAN (Radford et al. 2016) and the small ResNet
pair of SNGAN (Miyato et al. 2018, Appendix B.4), both optionally class-conditional.

Generators map ``z`` ``(B, z_dim)`` float (standard normal) and optional labels ``(B,)`` int64 to images
``(B, C, H, W)`` in ``[-1, 1]`` (tanh). Discriminators map images (and labels) to scores ``(B,)`` (logits).
Conditioning: the generator concatenates a learned class embedding to ``z``; the discriminator adds the
projection term ``⟨embed(y), φ(x)⟩`` (Miyato & Koyama 2018, Eq. 3).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

D_NORMS = ("batch", "spectral", "none")
G_UPSAMPLES = ("transposed", "nearest")


def num_upsamplings(image_size: int) -> int:
    """Number of ×2 stages from 4×4 to ``image_size`` (a power of two ≥ 8).

    Raises:
        ValueError: when ``image_size`` is not a power of two ≥ 8 (naming ``data.image_size``).
    """
    n = math.log2(image_size / 4) if image_size > 0 else -1
    if image_size < 8 or n != int(n):
        raise ValueError(f"data.image_size={image_size} is not supported by the GAN nets; use 8, 16, 32, 64, ...")
    return int(n)


def _check_norm(norm: str) -> None:
    if norm not in D_NORMS:
        raise ValueError(f"model.discriminator.norm={norm!r} is not allowed; choose one of {list(D_NORMS)}")


def _sn(module: nn.Module, use: bool) -> nn.Module:
    return spectral_norm(module) if use else module


class _LabelEmbedding(nn.Module):
    """Concatenate a class embedding to ``z`` (identity when unconditional)."""

    def __init__(self, num_classes: int | None, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes, dim) if num_classes else None

    @property
    def extra(self) -> int:
        return 0 if self.embed is None else self.embed.embedding_dim

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.embed is None:
            return z
        if labels is None:
            raise ValueError("this generator is class-conditional: pass labels (B,) int64")
        return torch.cat([z, self.embed(labels)], dim=1)


class _Projection(nn.Module):
    """Projection-discriminator head: ``linear(h) + ⟨embed(y), h⟩`` on pooled features ``h`` ``(B, F)``."""

    def __init__(self, features: int, num_classes: int | None, sn: bool) -> None:
        super().__init__()
        self.linear = _sn(nn.Linear(features, 1), sn)
        self.embed = _sn(nn.Embedding(num_classes, features), sn) if num_classes else None

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        out = self.linear(h).flatten()
        if self.embed is not None:
            if labels is None:
                raise ValueError("this discriminator is class-conditional: pass labels (B,) int64")
            out = out + (self.embed(labels) * h).sum(dim=1)
        return out


def _up(cin: int, cout: int, mode: str, bias: bool) -> list[nn.Module]:
    """One ×2 stage: a 4×4 stride-2 transposed conv, or nearest-neighbour ×2 then a 3×3 conv."""
    if mode == "transposed":
        return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=bias)]
    return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, 1, 1, bias=bias)]


class DCGANGenerator(nn.Module):
    """DCGAN generator: ``z`` → 4×4 → ×2 stages (BatchNorm + ReLU) → ``(B, C, S, S)``, tanh.

    Args:
        image_size: output side ``S`` (power of two ≥ 8).
        channels: output channels ``C``.
        z_dim: latent size.
        base_channels: channels at the last hidden stage (``ngf``); the 4×4 stage has ``ngf · 2^(n-1)``.
        num_classes: classes for a conditional generator, ``None`` for unconditional.
        embed_dim: size of the class embedding concatenated to ``z``.
        upsample: ``transposed`` (4×4 stride-2 transposed convs, as in DCGAN) or ``nearest`` (nearest-neighbour
            ×2 then a 3×3 conv: no checkerboard from uneven kernel overlap, Odena et al. 2016, "Deconvolution and
            checkerboard artifacts"; ~2.25× the FLOPs of a stage).

    Raises:
        ValueError: for an ``upsample`` other than ``transposed`` or ``nearest`` (naming the key).
    """

    def __init__(self, image_size: int = 32, channels: int = 1, z_dim: int = 100, base_channels: int = 64,
                 num_classes: int | None = None, embed_dim: int = 32, upsample: str = "transposed") -> None:
        super().__init__()
        if upsample not in G_UPSAMPLES:
            raise ValueError(f"model.generator.upsample={upsample!r} is not allowed; choose one of "
                             f"{list(G_UPSAMPLES)}")
        n = num_upsamplings(image_size)
        self.z_dim, self.num_classes = z_dim, num_classes
        self.cond = _LabelEmbedding(num_classes, embed_dim)
        ch = base_channels * 2 ** (n - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(z_dim + self.cond.extra, ch, 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(n - 1):
            layers += [*_up(ch, ch // 2, upsample, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [*_up(ch, channels, upsample, bias=True), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.main(self.cond(z, labels)[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: strided 4×4 convs with LeakyReLU(0.2) down to 4×4, then a linear (projection) head.

    Args:
        image_size: input side (power of two ≥ 8).
        channels: input channels.
        base_channels: channels of the first conv (``ndf``), doubled at each stage.
        norm: ``batch`` (BatchNorm after every conv but the first, as in DCGAN), ``spectral`` (spectral norm on
            every layer, Miyato et al. 2018) or ``none`` (use with ``wgan_gp``, whose penalty is per sample).
        num_classes: classes for a projection discriminator, ``None`` for unconditional.
    """

    def __init__(self, image_size: int = 32, channels: int = 1, base_channels: int = 64, norm: str = "batch",
                 num_classes: int | None = None) -> None:
        super().__init__()
        _check_norm(norm)
        n, sn = num_upsamplings(image_size), norm == "spectral"
        ch = base_channels
        layers: list[nn.Module] = [_sn(nn.Conv2d(channels, ch, 4, 2, 1), sn), nn.LeakyReLU(0.2, True)]
        for _ in range(n - 1):
            layers.append(_sn(nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=norm != "batch"), sn))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(ch * 2))
            layers.append(nn.LeakyReLU(0.2, True))
            ch *= 2
        self.main = nn.Sequential(*layers)
        self.head = _Projection(ch * 16, num_classes, sn)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.main(x).flatten(1), labels)


class _GBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Upsample(scale_factor=2),
                                  nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1))
        self.skip = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class _DBlock(nn.Module):
    def __init__(self, cin: int, cout: int, down: bool, first: bool, sn: bool) -> None:
        super().__init__()
        pre: list[nn.Module] = [] if first else [nn.ReLU()]
        self.body = nn.Sequential(*pre, _sn(nn.Conv2d(cin, cout, 3, 1, 1), sn), nn.ReLU(),
                                  _sn(nn.Conv2d(cout, cout, 3, 1, 1), sn), *([nn.AvgPool2d(2)] if down else []))
        skip: list[nn.Module] = []
        if cin != cout or down:
            skip = [_sn(nn.Conv2d(cin, cout, 1), sn), *([nn.AvgPool2d(2)] if down else [])]
        self.skip = nn.Sequential(*skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class ResNetGenerator(nn.Module):
    """SNGAN ResNet generator: linear to ``(ch, 4, 4)``, pre-activation up-blocks, BN-ReLU-conv3×3-tanh.

    Args: as :class:`DCGANGenerator`; ``base_channels`` is the width of every block (SNGAN uses 256 at 32 px).
    """

    def __init__(self, image_size: int = 32, channels: int = 1, z_dim: int = 128, base_channels: int = 128,
                 num_classes: int | None = None, embed_dim: int = 32) -> None:
        super().__init__()
        n = num_upsamplings(image_size)
        self.z_dim, self.num_classes = z_dim, num_classes
        self.cond = _LabelEmbedding(num_classes, embed_dim)
        self.ch = base_channels
        self.linear = nn.Linear(z_dim + self.cond.extra, base_channels * 16)
        self.blocks = nn.Sequential(*[_GBlock(base_channels, base_channels) for _ in range(n)])
        self.out = nn.Sequential(nn.BatchNorm2d(base_channels), nn.ReLU(),
                                 nn.Conv2d(base_channels, channels, 3, 1, 1), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.linear(self.cond(z, labels)).view(-1, self.ch, 4, 4)
        return self.out(self.blocks(h))


class ResNetDiscriminator(nn.Module):
    """SNGAN ResNet discriminator: residual down-blocks to 4×4 (then one more block), ReLU, global sum pooling,
    linear (projection) head.

    Args: as :class:`DCGANDiscriminator`; ``norm`` is ``spectral`` or ``none`` (``batch`` is not used here).
    """

    def __init__(self, image_size: int = 32, channels: int = 1, base_channels: int = 128, norm: str = "spectral",
                 num_classes: int | None = None) -> None:
        super().__init__()
        _check_norm(norm)
        if norm == "batch":
            raise ValueError("model.discriminator.norm='batch' is not supported by ResNetDiscriminator; "
                             "choose one of ['spectral', 'none']")
        n, sn = num_upsamplings(image_size), norm == "spectral"
        blocks = [_DBlock(channels, base_channels, down=True, first=True, sn=sn)]
        blocks += [_DBlock(base_channels, base_channels, down=True, first=False, sn=sn) for _ in range(n - 1)]
        blocks.append(_DBlock(base_channels, base_channels, down=False, first=False, sn=sn))
        self.blocks = nn.Sequential(*blocks, nn.ReLU())
        self.head = _Projection(base_channels, num_classes, sn)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.blocks(x).sum(dim=(2, 3)), labels)
