"""Image transformation network for feed-forward style transfer (Johnson, Alahi & Fei-Fei 2016, "Perceptual
Losses for Real-Time Style Transfer and Super-Resolution", supplementary Table 1), with instance normalisation
(Ulyanov, Vedaldi & Lempitsky 2016, "Instance Normalization: The Missing Ingredient for Fast Stylization") and
upsample-then-convolve decoding instead of transposed convolutions (Odena et al. 2016, no checkerboard artefacts).

Layout: 9×9 conv (32) → 3×3 stride-2 convs (64, 128) → 5 residual blocks (128) → 2× (nearest upsample, 3×3 conv)
(64, 32) → 9×9 conv (3). Reflection padding throughout; 1.68 M parameters at the default width.
"""

from __future__ import annotations

import torch
from torch import nn

from atelier.nets.padding import pad_to_multiple


class ConvLayer(nn.Sequential):
    """Reflection padding + convolution (+ instance norm + ReLU), optionally preceded by ×2 nearest upsampling."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, upsample: bool = False,
                 norm: bool = True, relu: bool = True) -> None:
        layers: list[nn.Module] = [nn.Upsample(scale_factor=2, mode="nearest")] if upsample else []
        layers += [nn.ReflectionPad2d(kernel_size // 2), nn.Conv2d(c_in, c_out, kernel_size, stride)]
        if norm:
            layers.append(nn.InstanceNorm2d(c_out, affine=True))
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """``x + IN(conv(ReLU(IN(conv(x)))))`` with 3×3 convolutions (Johnson et al. 2016, supp. Fig. 1, without the
    centre crop thanks to padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvLayer(channels, channels, 3), ConvLayer(channels, channels, 3, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class TransformerNet(nn.Module):
    """Johnson et al. 2016 image transformation network.

    ``(B, 3, H, W)`` in ``[-1, 1]`` → ``(B, 3, H, W)`` (unbounded; clamp to ``[-1, 1]`` for display). Any
    ``H, W``: inputs are reflection-padded to a multiple of 4 and the output cropped back.

    Args:
        base_channels: width of the first layer (32 in the paper); the others are 2× and 4× that.
        num_residual: residual blocks (5 in the paper).
        in_channels: input channels (1-channel inputs are repeated to 3 when ``in_channels=3``).
        out_channels: output channels.
    """

    def __init__(self, base_channels: int = 32, num_residual: int = 5, in_channels: int = 3,
                 out_channels: int = 3) -> None:
        super().__init__()
        c1, c2, c3 = base_channels, 2 * base_channels, 4 * base_channels
        self.in_channels = in_channels
        self.encoder = nn.Sequential(ConvLayer(in_channels, c1, 9), ConvLayer(c1, c2, 3, stride=2),
                                     ConvLayer(c2, c3, 3, stride=2))
        self.residual = nn.Sequential(*[ResidualBlock(c3) for _ in range(num_residual)])
        self.decoder = nn.Sequential(ConvLayer(c3, c2, 3, upsample=True), ConvLayer(c2, c1, 3, upsample=True),
                                     ConvLayer(c1, out_channels, 9, norm=False, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        x, (h, w) = pad_to_multiple(x, 4)
        y = self.decoder(self.residual(self.encoder(x)))
        return y[..., :h, :w]
