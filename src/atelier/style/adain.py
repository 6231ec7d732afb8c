"""Adaptive instance normalisation and its decoder (Huang & Belongie 2017, "Arbitrary Style Transfer in
Real-time with Adaptive Instance Normalization").

``AdaIN(x, y) = σ(y) · (x − μ(x)) / σ(x) + μ(y)`` (Eq. 8): the content features ``x`` get the per-channel mean
and std of the style features ``y``. A decoder trained to invert VGG-19's relu4_1 then maps the result back to an
image. Style strength α interpolates in feature space, ``t = α · AdaIN(f(c), f(s)) + (1 − α) · f(c)``
(Sec. 7.1), and several styles mix as ``Σ_k w_k · AdaIN(f(c), f(s_k))`` (Fig. 8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from atelier.style.losses import mean_std


def adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Huang & Belongie 2017, Eq. 8.

    Args:
        content: ``(B, C, H, W)`` content features.
        style: ``(B or 1, C, H_s, W_s)`` style features (any spatial size).
        eps: added to the variances.

    Returns:
        ``(B, C, H, W)`` whose per-channel spatial mean and (biased) std equal those of ``style``.
    """
    c_mean, c_std = mean_std(content, eps)
    s_mean, s_std = mean_std(style, eps)
    return (content - c_mean) / c_std * s_std + s_mean


def blend_adain(content: torch.Tensor, styles: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
                alpha: float = 1.0) -> torch.Tensor:
    """Target features for a decoder: ``α · Σ_k w_k AdaIN(content, styles[k]) + (1 − α) · content``.

    Args:
        content: ``(B, C, H, W)`` content features.
        styles: style features, each ``(B or 1, C, H_k, W_k)``.
        weights: one per style, normalised to sum to 1 (default equal).
        alpha: style strength in ``[0, 1]`` (0: content only, 1: full style).

    Raises:
        ValueError: for ``alpha`` outside ``[0, 1]``, no style, a wrong weight count, negative weights or a zero sum.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not styles:
        raise ValueError("at least one style image is needed")
    weights = [1.0] * len(styles) if weights is None else list(weights)
    if len(weights) != len(styles) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"style_weights {weights} must be one non-negative weight per style ({len(styles)}) "
                         f"with a positive sum")
    total = float(sum(weights))
    target = sum(w / total * adain(content, s) for w, s in zip(weights, styles, strict=True))
    return alpha * target + (1 - alpha) * content


class _UpConv(nn.Sequential):
    """Reflection-padded 3×3 convolution, optionally followed by ReLU."""

    def __init__(self, c_in: int, c_out: int, relu: bool = True) -> None:
        layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(c_in, c_out, 3)]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class AdaINDecoder(nn.Module):
    """Decoder mirroring VGG-19 up to relu4_1 (Huang & Belongie 2017, Sec. 6.1): reflection padding, nearest
    upsampling instead of pooling, no normalisation layers.

    ``(B, in_channels, H/8, W/8)`` features → ``(B, 3, H, W)`` image (unbounded; ≈ ``[-1, 1]`` after training).
    With ``channels=(256, 128, 64)`` (the paper's) it has 3.5 M parameters.

    Args:
        in_channels: channels of the encoder's output (512 for relu4_1).
        channels: widths of the three stages (at 1/8, 1/4 and 1/2 … full resolution); small values for tests.
        convs_per_stage: 3×3 convolutions after the first one of each stage: ``(3, 1, 1)`` as in the paper.
        out_channels: image channels.
    """

    def __init__(self, in_channels: int = 512, channels: Sequence[int] = (256, 128, 64),
                 convs_per_stage: Sequence[int] = (3, 1, 1), out_channels: int = 3) -> None:
        super().__init__()
        c1, c2, c3 = channels
        n1, n2, n3 = convs_per_stage
        layers: list[nn.Module] = [_UpConv(in_channels, c1), nn.Upsample(scale_factor=2, mode="nearest")]
        layers += [_UpConv(c1, c1) for _ in range(n1)]
        layers += [_UpConv(c1, c2), nn.Upsample(scale_factor=2, mode="nearest")]
        layers += [_UpConv(c2, c2) for _ in range(n2)]
        layers += [_UpConv(c2, c3), nn.Upsample(scale_factor=2, mode="nearest")]
        layers += [_UpConv(c3, c3) for _ in range(n3)]
        layers.append(_UpConv(c3, out_channels, relu=False))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)
