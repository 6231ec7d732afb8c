"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

The same random, differentiable transforms are applied to real and generated images before the discriminator,
in both the D and the G step, so G gets gradients through them and D cannot overfit a small dataset. Policies
(Sec. 3 of the paper): ``color`` (brightness, saturation, contrast), ``translation`` (up to 1/8 of the image,
zero padding) and ``cutout`` (a zeroed square of half the image size).
"""

from __future__ import annotations

import torch

POLICIES = ("color", "translation", "cutout")


def parse_policy(policy: str | None) -> tuple[str, ...]:
    """``"color,translation"`` → ``("color", "translation")``; empty or ``None`` → ``()``.

    Raises:
        ValueError: for an unknown policy name (naming ``model.diffaugment`` and the allowed names).
    """
    names = tuple(p.strip() for p in (policy or "").split(",") if p.strip())
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"model.diffaugment={policy!r} has unknown policies {unknown}; use a comma-separated "
                         f"subset of {list(POLICIES)}")
    return names


def rand_color(x: torch.Tensor) -> torch.Tensor:
    """Random brightness (±0.5), saturation (×[0, 2]) and contrast (×[0.5, 1.5]) per sample, on ``[-1, 1]``
    images ``(B, C, H, W)``; saturation only applies to 3-channel images."""
    b = x.shape[0]
    x = x + (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)
    if x.shape[1] == 3:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


def rand_translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by a random whole number of pixels, up to ``ratio`` of its size in each direction,
    filling with zeros."""
    b, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (b,), device=x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (b,), device=x.device)
    rows = torch.arange(h, device=x.device)[None, :] - dy[:, None]  # (B, H) source row of each output row
    cols = torch.arange(w, device=x.device)[None, :] - dx[:, None]
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return out * valid[:, None].to(x.dtype)


def rand_cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero a random square of ``ratio`` × the image size in each image (the square may cross the border)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys - cy).abs() * 2 < ch) & ((xs - cx).abs() * 2 < cw)
    return x * (~inside)[:, None].to(x.dtype)


_OPS = {"color": rand_color, "translation": rand_translation, "cutout": rand_cutout}


def diff_augment(x: torch.Tensor, policy: tuple[str, ...]) -> torch.Tensor:
    """Apply the policies in order to ``(B, C, H, W)`` images; differentiable with respect to ``x``."""
    for name in policy:
        x = _OPS[name](x)
    return x.contiguous()
