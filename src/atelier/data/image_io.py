"""Reading image files for every image-folder dataset: one decoding function, :func:`load_rgb`.

What it does to a file, in order:

1. **Draft decoding.** When the caller needs only ``size`` px (short side), a JPEG is decoded at a reduced DCT
   scale (1/2, 1/4 or 1/8; :meth:`PIL.Image.Image.draft`) that still leaves a short side of at least
   ``DRAFT_MARGIN × size`` px, so a 6000 px scan costs a fraction of a full decode. Other formats decode in full.
2. **EXIF orientation** is applied (:func:`PIL.ImageOps.exif_transpose`): photographed paintings come out upright.
3. **8-bit RGB.** High-bit-depth images are *scaled*, not clipped, to 8 bits: value ``v`` becomes
   ``round(255 · v / full_scale)``, where ``full_scale`` is the true maximum of the mode (see
   :func:`full_scale`): 65535 for 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and for 32-bit
   integer images (``I``: what older Pillow gives 16-bit PNGs, and what a 16-bit image saved from Pillow as TIFF
   becomes; genuine 32-bit data saturates), 1.0 for float images (``F``, the float-TIFF convention); values outside
   ``[0, full_scale]`` are clipped. 16-bit RGB(A) PNG and TIFF files are opened by Pillow as 8-bit ``RGB``/``RGBA``
   holding the high byte of each sample (``v >> 8``, within one 8-bit level of the rule above). Palette, CMYK,
   YCbCr, LAB, greyscale and bilevel images are converted to RGB; transparency is composited on white.
4. **Fit** (with ``size``): resize the short side to ``size`` (antialiased bilinear, as
   :func:`atelier.data.transforms.art_transform`) and centre-crop to ``size × size``; the random parts of the
   training transform (flips) come after.
5. **Cache** (with ``cache_dir`` and ``size``): the fitted image is written once, as raw RGB bytes behind a
   small header that holds the source's path, size in bytes and mtime (:func:`read_cache_entry`), to
   ``cache_dir/<size>px/<sha1 of the resolved path>.rgb``. Later reads use it while the source's size and mtime
   are unchanged; a changed file is decoded again and its entry rewritten in place. Entries are written
   atomically (temporary file + rename), so DataLoader workers and DDP ranks may share a cache. Reading an entry
   is one file read, far cheaper than decoding even a small JPEG.

Multi-frame files (GIF, APNG, animated WebP) give their first frame. Decoding failures are raised as
:class:`UnreadableImageError` (an ``OSError``) naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from atelier.utils.files import atomic_target

#: extensions read (matched in any case: ``.JPG``, ``.Png``, ``.TIFF`` are images too)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

#: a drafted JPEG keeps a short side of at least ``DRAFT_MARGIN × size`` px before the final antialiased resize
DRAFT_MARGIN = 2

#: bump when the decoding or fitting changes, so that old cache entries are rebuilt
CACHE_VERSION = 1
CACHE_MAGIC = b"ATLC"
_HEADER = struct.Struct("<4sIHH")  # magic, key length, width, height

#: the errors Pillow raises for a file it cannot decode
READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)

HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "RGBa", "La", "PA")


class UnreadableImageError(OSError):
    """An image file that cannot be decoded; the message names the file and Pillow's reason."""


def is_image_file(path: Path) -> bool:
    """True for a file whose extension (any case) is in :data:`IMAGE_EXTENSIONS`."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def find_images(root: Path) -> list[Path]:
    """Every file under ``root`` (recursive) whose extension, in any case, is in :data:`IMAGE_EXTENSIONS`;
    sorted."""
    return sorted(p for p in Path(root).rglob("*") if is_image_file(p))


def full_scale(mode: str) -> float:
    """The value that maps to 255 when an image of PIL ``mode`` is reduced to 8 bits (see the module docs):
    65535 for ``I;16*`` and ``I``, 1.0 for ``F``, 255 for every 8-bit mode."""
    if mode.startswith("I;16") or mode == "I":
        return 65535.0
    if mode == "F":
        return 1.0
    return 255.0


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit ``RGB``: high-bit-depth greyscale scaled by :func:`full_scale` (``v`` →
    ``round(255 · v / full_scale)``, clipped to ``[0, 255]``), transparency composited on white, everything else
    through :meth:`PIL.Image.Image.convert`."""
    if image.mode in HIGH_DEPTH_MODES:
        a = np.asarray(image).astype(np.float64)
        a = np.clip(a / full_scale(image.mode), 0.0, 1.0) * 255.0 + 0.5
        image = Image.fromarray(a.astype(np.uint8))  # 2-D uint8: mode L
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fit(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` (antialiased bilinear) and centre-crop to ``size × size`` px; the same
    operations, with the same rounding, as the deterministic part of
    :func:`atelier.data.transforms.art_transform`, which then leaves the result unchanged."""
    image = v2.functional.resize(image, size, antialias=True)
    return v2.functional.center_crop(image, [size, size])


def decode(path: Path, size: int | None = None) -> Image.Image:
    """Decode ``path`` as an upright 8-bit RGB image (steps 1–3 of the module docs); ``size`` (px, short side
    the caller will resize to) lets a JPEG decode at reduced scale.

    Raises:
        UnreadableImageError: when Pillow cannot open or decode the file (naming it and the reason).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                if size is not None and im.format == "JPEG":
                    side = DRAFT_MARGIN * size
                    im.draft(None, (side, side))
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))
    except READ_ERRORS as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err


def cache_path(cache_dir: str | Path, path: str | Path, size: int) -> Path:
    """Where the ``size`` px entry of ``path`` lives: ``cache_dir/<size>px/<sha1 of the resolved path>.rgb``."""
    return _entry(Path(cache_dir), str(Path(path).resolve()), size)


def _entry(cache_dir: Path, source: str, size: int) -> Path:
    return cache_dir / f"{size}px" / f"{hashlib.sha1(source.encode('utf-8')).hexdigest()}.rgb"


def _cache_key(source: str, size: int) -> str:
    """The key an entry must hold to be used: the resolved ``source`` path, ``size`` and the file's current size
    and mtime (``os.stat``)."""
    st = os.stat(source)
    return json.dumps({"source": source, "size": size, "mtime_ns": st.st_mtime_ns, "bytes": st.st_size,
                       "version": CACHE_VERSION}, sort_keys=True)


def _parse_entry(data: bytes) -> tuple[bytes, Image.Image] | None:
    """``(key bytes, RGB image)`` of a complete entry; ``None`` for anything else (damaged, truncated)."""
    if data[:4] != CACHE_MAGIC or len(data) < _HEADER.size:
        return None
    _, n, w, h = _HEADER.unpack_from(data)
    start = _HEADER.size + n
    if len(data) != start + 3 * w * h:
        return None
    return data[_HEADER.size:start], Image.frombytes("RGB", (w, h), data[start:])


def read_cache_entry(entry: str | Path) -> tuple[dict, Image.Image]:
    """One cache entry: its key (``source`` path, ``size``, the source's ``mtime_ns`` and ``bytes``, ``version``)
    and its 8-bit RGB image.

    An entry is the 4 bytes ``ATLC``, the key's length (uint32), width and height (uint16, little-endian), the key
    as UTF-8 JSON and the raw RGB bytes, row-major: reading one costs a file read (~0.04 ms at 64 px), where
    decoding a PNG of the same size costs ~20 times more.

    Raises:
        OSError: when the file cannot be read; ValueError: when it is not a complete entry.
    """
    parsed = _parse_entry(Path(entry).read_bytes())
    if parsed is None:
        raise ValueError(f"{entry} is not a complete image cache entry")
    return json.loads(parsed[0]), parsed[1]


def _read_cache(entry: Path, key: str) -> Image.Image | None:
    """The cached image when ``entry`` exists and was written for ``key``; ``None`` otherwise (also for an
    entry that cannot be read, which is then rebuilt)."""
    try:
        parsed = _parse_entry(entry.read_bytes())
    except OSError:
        return None
    return parsed[1] if parsed is not None and parsed[0] == key.encode("utf-8") else None


def _write_cache(entry: Path, key: str, image: Image.Image) -> None:
    """Write ``image`` (RGB) to ``entry`` atomically (temporary file in the same folder, then rename).

    Raises:
        OSError: when the cache folder cannot be written, naming it and the config key.
    """
    raw_key = key.encode("utf-8")
    data = _HEADER.pack(CACHE_MAGIC, len(raw_key), *image.size) + raw_key + image.tobytes()
    try:
        with atomic_target(entry) as tmp:
            Path(tmp).write_bytes(data)
    except OSError as err:
        raise OSError(f"cannot write the image cache entry {entry} ({err}); check data.cache_dir, or set "
                      "data.cache=false") from err


def load_rgb(path: str | Path, size: int | None = None, cache_dir: str | Path | None = None) -> Image.Image:
    """Read an image file as an upright 8-bit RGB PIL image (every step of the module docs).

    Args:
        path: the image file (any format Pillow reads; see :data:`IMAGE_EXTENSIONS` for what folders offer).
        size: with a size, the result is fitted to ``(size, size)`` px (short side resized, centre crop) and a
            JPEG is decoded at reduced scale; ``None`` keeps the full image.
        cache_dir: cache folder for fitted images (needs ``size``; ``None``: no cache).

    Returns:
        ``RGB`` image, ``size × size`` when ``size`` is given.

    Raises:
        UnreadableImageError: when the file cannot be decoded (naming it and the reason).
        ValueError: for ``size < 1`` or a ``cache_dir`` without ``size``.
    """
    path = Path(path)
    if size is not None and size < 1:
        raise ValueError(f"image size must be >= 1 px, got {size}")
    if cache_dir is not None and size is None:
        raise ValueError("an image cache needs the training size (size=...)")
    if cache_dir is None or size is None:
        image = decode(path, size)
        return fit(image, size) if size is not None else image
    try:
        source = str(path.resolve())
        key = _cache_key(source, size)
    except OSError as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err
    entry = _entry(Path(cache_dir), source, size)
    cached = _read_cache(entry, key)
    if cached is not None:
        return cached
    image = fit(decode(path, size), size)
    _write_cache(entry, key, image)
    return image


def split_readable(paths: list[Path], size: int | None = None,
                   cache_dir: str | Path | None = None) -> tuple[list[Path], list[Path]]:
    """Read every image once with :func:`load_rgb` (same ``size`` and ``cache_dir``, so a file that passes will
    load in training, and with a cache the check fills it); return ``(readable, unreadable)`` paths."""
    good, bad = [], []
    for path in paths:
        try:
            load_rgb(path, size, cache_dir)
            good.append(path)
        except UnreadableImageError:
            bad.append(path)
    return good, bad
