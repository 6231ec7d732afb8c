"""Run fully convolutional networks on images of any size: pad to a multiple of the network's stride, crop back."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``(B, C, H, W)`` on the bottom and right so that ``H`` and ``W`` are multiples of ``multiple``.

    Reflection padding where the image is large enough, replication otherwise. Returns the padded tensor and the
    original ``(H, W)``; crop with ``y[..., :H, :W]``.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x, (h, w)
