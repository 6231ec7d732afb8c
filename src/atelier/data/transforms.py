"""Image transforms shared by the datamodules: PIL/uint8 in, float ``(C, H, W)`` in ``[-1, 1]`` out."""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def to_unit_range() -> v2.Compose:
    """uint8 image -> float32 tensor scaled from ``[0, 255]`` to ``[-1, 1]``."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5], [0.5])])


def mnist_transform(image_size: int, channels: int = 1) -> v2.Compose:
    """28 px MNIST digit -> ``(channels, image_size, image_size)`` in ``[-1, 1]``.

    Sizes above 28 are reached by zero-padding (black border) when the difference is at most 4 px (32 px, the
    usual DDPM size), otherwise by bilinear resizing; smaller sizes are resized.
    """
    steps: list[v2.Transform] = []
    if 28 < image_size <= 32:
        pad = image_size - 28
        steps.append(v2.Pad([pad // 2, pad // 2, pad - pad // 2, pad - pad // 2], fill=0))
    elif image_size != 28:
        steps.append(v2.Resize(image_size, antialias=True))
    if channels == 3:
        steps.append(v2.Grayscale(num_output_channels=3))
    return v2.Compose([*steps, to_unit_range()])


def art_transform(image_size: int, channels: int = 3, hflip: bool = True) -> v2.Compose:
    """Any-size PIL image -> ``(channels, image_size, image_size)`` in ``[-1, 1]``: resize short side, centre
    crop, optional random horizontal flip."""
    steps: list[v2.Transform] = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if channels == 1:
        steps.append(v2.Grayscale(num_output_channels=1))
    return v2.Compose([*steps, to_unit_range()])
