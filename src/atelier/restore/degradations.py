"""Synthetic degradations for training and evaluating restoration networks.

Each degradation maps clean images ``(B, C, H, W)`` float in ``[-1, 1]`` to degraded images of the same shape
and range, drawing its randomness from an optional ``torch.Generator`` (a CPU generator gives the same result on
every device). Parameters use the usual units: noise σ in ``[0, 1]`` intensity units (σ = 0.1 ≈ 25/255), blur
σ and lengths in pixels, masks as fractions of the image side.

Configured in YAML as a list (``model.degradations``), one entry per named degradation::

    - {_target_: atelier.restore.degradations.GaussianNoise, name: noise, sigma: 0.1}
    - {_target_: atelier.restore.degradations.Downsample, name: down4, factor: 4}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` values uniform in ``[low, high]`` (CPU, float32)."""
    return low + (high - low) * torch.rand(n, generator=generator)


def _range(value: float | Sequence[float], name: str) -> tuple[float, float]:
    """A scalar or a ``[min, max]`` pair as ``(min, max)``."""
    low, high = (value, value) if isinstance(value, int | float) else tuple(float(v) for v in value)
    if low > high or low < 0:
        raise ValueError(f"{name} must be >= 0 or a [min, max] pair with min <= max, got {value}")
    return float(low), float(high)


class Degradation:
    """Base class: ``degradation(x, generator=None) -> (B, C, H, W)`` in ``[-1, 1]`` (``clip``: clamped)."""

    def __init__(self, name: str, clip: bool = True) -> None:
        if not name or "/" in name:
            raise ValueError(f"a degradation needs a name without '/', got {name!r}")
        self.name = name
        self.clip = clip

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        y = self.apply(x, generator)
        return y.clamp(-1, 1) if self.clip else y

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class GaussianNoise(Degradation):
    """Additive white Gaussian noise ``y = x + n``, ``n ~ N(0, σ²)`` per pixel and channel, σ in ``[0, 1]``
    intensity units (twice that in the ``[-1, 1]`` range). ``sigma=[a, b]`` draws σ per image uniformly.

    Without clipping, the PSNR of ``y`` against ``x`` (intensities in ``[0, 1]``) is ``10·log10(1 / σ²)`` in
    expectation: 20 dB for σ = 0.1.
    """

    def __init__(self, name: str = "noise", sigma: float | Sequence[float] = 0.1, clip: bool = True) -> None:
        super().__init__(name, clip)
        self.sigma = _range(sigma, "sigma")

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        sigma = _uniform(x.shape[0], *self.sigma, generator).view(-1, 1, 1, 1)
        # a given (CPU) generator makes the noise device-independent; without one, draw on the images' device
        device = "cpu" if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=device) * sigma.to(device)
        return x + 2 * noise.to(device=x.device, dtype=x.dtype)


class GaussianBlur(Degradation):
    """Isotropic Gaussian blur with std ``sigma`` px (``[a, b]``: one σ per batch call), kernel
    ``kernel_size`` px (default ``2·⌈3σ⌉ + 1``), reflection at the borders (torchvision ``gaussian_blur``)."""

    def __init__(self, name: str = "blur", sigma: float | Sequence[float] = 1.5, kernel_size: int | None = None,
                 clip: bool = True) -> None:
        super().__init__(name, clip)
        self.sigma = _range(sigma, "sigma")
        if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.kernel_size = kernel_size

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        sigma = float(_uniform(1, *self.sigma, generator))
        if sigma == 0:
            return x
        k = self.kernel_size or 2 * math.ceil(3 * sigma) + 1
        k = min(k, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)  # reflection needs the kernel to fit the image
        return TF.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])


def motion_kernel(length: float, angle: float, size: int) -> torch.Tensor:
    """Linear motion-blur kernel ``(size, size)`` summing to 1: a line of ``length`` px through the centre at
    ``angle`` degrees (0 = horizontal), rasterised with bilinear splatting of 4 samples per px."""
    kernel = torch.zeros(size, size)
    centre = (size - 1) / 2
    n = max(2, math.ceil(length * 4))
    t = torch.linspace(-length / 2, length / 2, n)
    xs = centre + t * math.cos(math.radians(angle))
    ys = centre - t * math.sin(math.radians(angle))
    x0, y0 = xs.floor(), ys.floor()
    for dx in (0, 1):
        for dy in (0, 1):
            w = (1 - (xs - x0 - dx).abs()) * (1 - (ys - y0 - dy).abs())
            xi, yi = (x0 + dx).long(), (y0 + dy).long()
            ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
            kernel.index_put_((yi[ok], xi[ok]), w[ok], accumulate=True)
    return kernel / kernel.sum()


class MotionBlur(Degradation):
    """Linear camera-shake blur: each image is convolved with a line kernel of ``length`` px (``[a, b]``: per
    image) at an angle drawn uniformly in ``[0°, 180°)`` (or the fixed ``angle``); reflection at the borders."""

    def __init__(self, name: str = "motion", length: float | Sequence[float] = 9, angle: float | None = None,
                 clip: bool = True) -> None:
        super().__init__(name, clip)
        self.length = _range(length, "length")
        self.angle = angle

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, c, h, w = x.shape
        lengths = _uniform(b, *self.length, generator)
        angles = _uniform(b, 0.0, 180.0, generator) if self.angle is None else torch.full((b,), float(self.angle))
        size = 2 * math.ceil(float(lengths.max()) / 2) + 1
        size = min(size, 2 * ((min(h, w) - 1) // 2) + 1)
        kernels = torch.stack([motion_kernel(float(n), float(a), size) for n, a in zip(lengths, angles, strict=True)])
        weight = kernels.repeat_interleave(c, dim=0).unsqueeze(1).to(device=x.device, dtype=x.dtype)
        padded = F.pad(x.reshape(1, b * c, h, w), [size // 2] * 4, mode="reflect")
        return F.conv2d(padded, weight, groups=b * c).reshape(b, c, h, w)


class Downsample(Degradation):
    """Loss of resolution: antialiased bicubic downsampling by ``factor`` (2 or 4 for ×2/×4 super-resolution),
    then bicubic upsampling back to the input size, so the restoration network sees same-size input and output.
    :meth:`down` gives the low-resolution image ``(B, C, H // factor, W // factor)``."""

    def __init__(self, name: str = "down2", factor: int = 2, mode: str = "bicubic", clip: bool = True) -> None:
        super().__init__(name, clip)
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        if mode not in ("bicubic", "bilinear"):
            raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
        self.factor = int(factor)
        self.mode = mode

    def down(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        size = (max(1, h // self.factor), max(1, w // self.factor))
        return F.interpolate(x, size=size, mode=self.mode, antialias=True, align_corners=False)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return F.interpolate(self.down(x), size=x.shape[-2:], mode=self.mode, align_corners=False)


class RandomMask(Degradation):
    """Inpainting holes: ``1 … max_boxes`` axis-aligned rectangles per image, each side a uniform fraction in
    ``[min_size, max_size]`` of the image side, filled with ``fill`` (0 = mid-grey in ``[-1, 1]``).
    :meth:`mask` gives the boolean hole mask ``(B, 1, H, W)``."""

    def __init__(self, name: str = "inpaint", max_boxes: int = 3, min_size: float = 0.1, max_size: float = 0.35,
                 fill: float = 0.0, clip: bool = True) -> None:
        super().__init__(name, clip)
        if max_boxes < 1 or not 0 < min_size <= max_size <= 1:
            raise ValueError(f"need max_boxes >= 1 and 0 < min_size <= max_size <= 1, got {max_boxes}, "
                             f"{min_size}, {max_size}")
        self.max_boxes, self.min_size, self.max_size, self.fill = max_boxes, min_size, max_size, fill

    def mask(self, shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = shape
        holes = torch.zeros(b, 1, h, w, dtype=torch.bool)
        counts = torch.randint(1, self.max_boxes + 1, (b,), generator=generator)
        rows, cols = torch.arange(h).view(-1, 1), torch.arange(w).view(1, -1)
        for i in range(b):
            n = int(counts[i])
            bh = (_uniform(n, self.min_size, self.max_size, generator) * h).round().clamp(1, h).long()
            bw = (_uniform(n, self.min_size, self.max_size, generator) * w).round().clamp(1, w).long()
            top = (torch.rand(n, generator=generator) * (h - bh + 1)).long()
            left = (torch.rand(n, generator=generator) * (w - bw + 1)).long()
            for j in range(n):
                holes[i, 0] |= ((rows >= top[j]) & (rows < top[j] + bh[j]) & (cols >= left[j])
                                & (cols < left[j] + bw[j]))
        return holes

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        holes = self.mask(x.shape, generator).to(x.device)
        return torch.where(holes, torch.full_like(x, self.fill), x)


class Chain(Degradation):
    """Several degradations in sequence (e.g. blur, then downsampling, then noise), under one name."""

    def __init__(self, name: str, steps: Sequence[Degradation], clip: bool = True) -> None:
        super().__init__(name, clip)
        if not steps:
            raise ValueError("Chain needs at least one step")
        self.steps = list(steps)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        for step in self.steps:
            x = step(x, generator)
        return x


def check_names(degradations: Sequence[Degradation]) -> list[str]:
    """Names of ``degradations``.

    Raises:
        ValueError: for an empty list, a non-degradation entry or repeated names (naming them).
    """
    if not degradations:
        raise ValueError("model.degradations is empty; configure at least one degradation")
    bad = [d for d in degradations if not isinstance(d, Degradation)]
    if bad:
        raise ValueError(f"model.degradations entries must be atelier.restore.degradations.Degradation, got {bad}")
    names = [d.name for d in degradations]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"model.degradations names must be unique; repeated: {repeated}")
    return names
