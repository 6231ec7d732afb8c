"""Image files at the edges of stylisation and restoration: load any image, save PNGs with their settings, build
side-by-side panels.

Inside Atelier images are float ``(1, 3, H, W)`` tensors in ``[-1, 1]``; on disk they are 8-bit RGB PNGs.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

METADATA_KEY = "atelier"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: greyscale (8/16/32-bit), palette, CMYK, YCbCr, LAB; transparency is composited on
    white (a transparent background would otherwise turn black)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if image.mode.startswith("I;16") or a.max() > 255 else (0.0, 255.0)
        if image.mode == "F" and a.max() <= 1.0:
            hi = 1.0
        image = Image.fromarray(np.clip((a - lo) / (hi - lo) * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_long_side(image: Image.Image, size: int | None) -> Image.Image:
    """Resize so that the longer side is ``size`` px (aspect ratio kept; Lanczos); ``None`` keeps the size."""
    if size is None:
        return image
    if size < 1:
        raise ValueError(f"image size must be >= 1 px, got {size}")
    w, h = image.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image if new == image.size else image.resize(new, Image.Resampling.LANCZOS)


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """Read an image file as ``(1, 3, H, W)`` float32 in ``[-1, 1]``.

    Any format PIL reads; EXIF rotation applied; greyscale, 16-bit, palette, RGBA (on white) and CMYK converted to
    RGB. ``size`` resizes the longer side (aspect ratio kept).

    Raises:
        FileNotFoundError: when ``path`` does not exist or is not a file (naming it).
        ValueError: when ``path`` cannot be decoded as an image (naming it and the reason).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"input image {path} does not exist" if not path.exists()
                                else f"input image {path} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
                image = _to_rgb(ImageOps.exif_transpose(im))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    image = resize_long_side(image, size)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return (x / 127.5 - 1).unsqueeze(0).contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(1, 3, H, W)`` or ``(3, H, W)`` in ``[-1, 1]`` → ``(H, W, 3)`` uint8 (clamped, rounded)."""
    x = x.detach().float().cpu()
    if x.dim() == 4:
        x = x[0]
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def save_png(x: torch.Tensor, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Save ``(1, 3, H, W)`` in ``[-1, 1]`` as an 8-bit RGB PNG; ``metadata`` goes into a ``tEXt`` chunk named
    ``atelier`` as JSON (read it back with :func:`read_png_metadata`, or any PNG tool)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    if metadata:
        info.add_text(METADATA_KEY, json.dumps(dict(metadata), default=str, sort_keys=True))
    Image.fromarray(to_uint8(x)).save(path, format="PNG", pnginfo=info)
    return path


def read_png_metadata(path: str | Path) -> dict[str, Any]:
    """The settings that :func:`save_png` stored in ``path`` (``{}`` when there are none)."""
    with Image.open(path) as im:
        text = getattr(im, "text", {}) or {}
    return json.loads(text[METADATA_KEY]) if METADATA_KEY in text else {}


def side_by_side(images: Sequence[torch.Tensor], height: int | None = None, gap: int = 8) -> torch.Tensor:
    """Panel of images in one row, each resized (bilinear, aspect kept) to a common ``height`` (default: the
    first image's), separated by ``gap`` px of white: ``(1, 3, height, ΣW + gaps)`` in ``[-1, 1]``."""
    if not images:
        raise ValueError("side_by_side needs at least one image")
    height = height or images[0].shape[-2]
    row: list[torch.Tensor] = []
    for i, x in enumerate(images):
        x = x.detach().float().cpu()
        x = x.unsqueeze(0) if x.dim() == 3 else x[:1]
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        h, w = x.shape[-2:]
        width = max(1, round(w * height / h))
        if (h, w) != (height, width):
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        if i:
            row.append(torch.ones(1, 3, height, gap))
        row.append(x.clamp(-1, 1))
    return torch.cat(row, dim=-1)
