"""Image files read faithfully (atelier.data.image_io through the art-folder datasets): 16-bit images scaled to
8 bits, EXIF orientation, TIFF/GIF and uppercase extensions, draft decoding of large JPEGs, the on-disk cache.

Every file is written by the test itself; 16-bit RGB PNG/TIFF (which Pillow cannot write) by the small writers
below."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.data import image_io
from atelier.data.art_folder import ArtFolderDataModule, ImageFolderDataset
from atelier.data.captioned_folder import CaptionedFolderDataModule
from atelier.data.image_io import cache_path, decode, find_images, fit, full_scale, load_rgb, read_cache_entry
from atelier.data.transforms import art_transform, to_unit_range

LEVEL = 1 / 127.5  # one 8-bit level in [-1, 1]


def write_png16(path: Path, a: np.ndarray) -> None:
    """``(H, W)`` or ``(H, W, 3)`` uint16 → 16-bit greyscale or RGB PNG (written by hand; Pillow cannot)."""
    a = np.asarray(a, dtype=np.uint16)
    h, w = a.shape[:2]
    color_type = 0 if a.ndim == 2 else 2
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_tiff16(path: Path, a: np.ndarray, big_endian: bool = False) -> None:
    """``(H, W)`` or ``(H, W, 3)`` uint16 → uncompressed 16-bit greyscale or RGB TIFF (written by hand)."""
    a = np.asarray(a, dtype=np.uint16)
    h, w = a.shape[:2]
    spp = 1 if a.ndim == 2 else a.shape[2]
    e = ">" if big_endian else "<"
    pixels = a.astype(e + "u2").tobytes()
    n_tags = 9 if spp == 1 else 10
    extra_at = 8 + 2 + 12 * n_tags + 4
    extra = b"" if spp == 1 else struct.pack(e + "H" * spp, *([16] * spp))
    pixels_at = extra_at + len(extra)
    tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, spp, 16 if spp == 1 else extra_at), (259, 3, 1, 1),
            (262, 3, 1, 1 if spp == 1 else 2), (273, 4, 1, pixels_at), (277, 3, 1, spp), (278, 4, 1, h),
            (279, 4, 1, len(pixels))] + ([] if spp == 1 else [(284, 3, 1, 1)])
    out = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(e + "I", 8) + struct.pack(e + "H", len(tags))
    for tag, kind, count, value in tags:
        short = kind == 3 and count == 1
        out += struct.pack(e + ("HHIHH" if short else "HHII"), tag, kind, count, value, *([0] if short else []))
    path.write_bytes(out + struct.pack(e + "I", 0) + extra + pixels)


def gradient16(h: int = 8, w: int = 256) -> np.ndarray:
    """``(h, w)`` uint16, each row 0 … 65535 left to right."""
    return np.tile(np.linspace(0, 65535, w).round().astype(np.uint16), (h, 1))


def as_tensor(path: Path) -> torch.Tensor:
    """The full-size image as the datasets read it: ``(3, H, W)`` float32 in [-1, 1]."""
    return to_unit_range()(load_rgb(path))


def expected(v: np.ndarray) -> torch.Tensor:
    """16-bit values → the [-1, 1] values the 16-bit rule promises (round(255 v / 65535))."""
    return torch.from_numpy(np.round(v / 65535 * 255) / 127.5 - 1).float()


# --- 16-bit -----------------------------------------------------------------------------------------------------


def test_16bit_grey_png_was_clipped_now_scaled(tmp_path: Path) -> None:
    """The bug: a 16-bit greyscale PNG came out ~99 % white through ImageFolderDataset (values clipped at 255)."""
    g = gradient16(256, 256)
    Image.fromarray(g).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "I;16"
    x, _ = ImageFolderDataset(tmp_path, [tmp_path / "g.png"], to_unit_range())[0]
    assert x.shape == (3, 256, 256) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    assert abs(x.mean().item()) < 0.01  # a 0 → 65535 ramp averages mid-grey
    assert (x > 0.99).float().mean() < 0.01  # was ≈ 0.99
    torch.testing.assert_close(x[0, 0], expected(g[0].astype(np.float64)), atol=LEVEL + 1e-6, rtol=0)
    # through the datamodule too (resized to 16 px): still a left-to-right ramp with mean ≈ 0
    dm = ArtFolderDataModule(str(tmp_path), image_size=16, batch_size=1, val_fraction=0, hflip=False)
    dm.setup()
    y = dm.train_set[0][0]
    assert abs(y.mean().item()) < 0.05 and y[0, 8, 0] < -0.8 and y[0, 8, -1] > 0.8


@pytest.mark.parametrize("kind", ["tiff_pillow", "tiff_le", "tiff_be", "png_hand"])
def test_16bit_grey_files_keep_their_gradient(tmp_path: Path, kind: str) -> None:
    g = gradient16()
    path = tmp_path / ("g.png" if kind == "png_hand" else "g.tif")
    if kind == "tiff_pillow":
        Image.fromarray(g).save(path)
    elif kind == "png_hand":
        write_png16(path, g)
    else:
        write_tiff16(path, g, big_endian=kind == "tiff_be")
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")
    x = as_tensor(path)
    assert x.shape == (3, 8, 256)
    torch.testing.assert_close(x[:, 0], expected(g[0].astype(np.float64)).expand(3, -1), atol=LEVEL + 1e-6, rtol=0)
    assert x.min() == -1 and x.max() == 1 and abs(x.mean().item()) < 0.01


@pytest.mark.parametrize("fmt", ["png", "tiff", "tiff_be"])
def test_16bit_rgb_files(tmp_path: Path, fmt: str) -> None:
    """R a ramp, G half of it, B the reverse ramp; Pillow gives 8-bit RGB (the high byte), within a level."""
    g = gradient16()
    rgb = np.stack([g, g // 2, 65535 - g], axis=-1)
    path = tmp_path / ("c.png" if fmt == "png" else "c.tif")
    if fmt == "png":
        write_png16(path, rgb)
    else:
        write_tiff16(path, rgb, big_endian=fmt == "tiff_be")
    x = as_tensor(path)
    assert x.shape == (3, 8, 256)
    for c in range(3):
        torch.testing.assert_close(x[c, 0], expected(rgb[0, :, c].astype(np.float64)), atol=LEVEL + 1e-6, rtol=0)
    means = x.mean(dim=(1, 2))
    assert abs(means[0]) < 0.01 and abs(means[2]) < 0.01 and abs(means[1] + 0.5) < 0.01  # G spans [-1, 0]
    assert x[1].max() < 0.01  # half-scale green is mid-grey at most, not white


def test_float_and_int_modes_follow_the_rule(tmp_path: Path) -> None:
    assert full_scale("I;16") == full_scale("I;16B") == full_scale("I") == 65535
    assert full_scale("F") == 1 and full_scale("RGB") == 255
    ramp = np.linspace(0, 1, 256, dtype=np.float32)[None].repeat(4, 0)
    Image.fromarray(ramp).save(tmp_path / "f.tif")  # mode F, [0, 1]
    x = as_tensor(tmp_path / "f.tif")
    assert x.min() == -1 and x.max() == 1 and abs(x.mean().item()) < 0.01
    over = Image.fromarray(np.full((4, 4), 2.5, np.float32))  # out of range: clipped, not wrapped
    assert np.asarray(image_io.to_rgb(over)).min() == 255
    i32 = Image.fromarray(gradient16().astype(np.int32))  # mode I (older Pillow's 16-bit PNG)
    assert i32.mode == "I"
    a = np.asarray(image_io.to_rgb(i32))[0, :, 0]
    np.testing.assert_allclose(a, np.round(gradient16()[0] / 257), atol=1)


# --- EXIF, formats, extensions ----------------------------------------------------------------------------------


def portrait_red_top(w: int = 20, h: int = 40) -> Image.Image:
    """``w × h`` (portrait): red top half, blue bottom half."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, :, 0] = 255
    a[h // 2 :, :, 2] = 255
    return Image.fromarray(a)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_applied(tmp_path: Path, orientation: int) -> None:
    """A camera JPEG stored sideways with orientation 6 (rotate 90° CW to view) or 8 (90° CCW) comes out as the
    painting hangs: portrait, red at the top."""
    shown = portrait_red_top()
    undo = Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270  # inverse of the tag
    stored = shown.transpose(undo)
    assert stored.size == (40, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    (tmp_path / "a").mkdir()
    path = tmp_path / "a" / "photo.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())
    x = as_tensor(path)
    assert x.shape == (3, 40, 20)  # (C, H, W): portrait
    top, bottom = x[:, :20].mean(dim=(1, 2)), x[:, 20:].mean(dim=(1, 2))
    assert top[0] > 0.9 and top[2] < -0.8 and bottom[2] > 0.9 and bottom[0] < -0.8
    # training crops (square, centre) keep red above blue
    dm = ArtFolderDataModule(str(tmp_path), image_size=16, batch_size=1, val_fraction=0, hflip=False)
    dm.setup()
    y = dm.train_set[0][0]
    assert y.shape == (3, 16, 16)
    assert y[0, :6].mean() > 0.9 and y[2, :6].mean() < -0.8 and y[2, -6:].mean() > 0.9 and y[0, -6:].mean() < -0.8


def test_tiff_gif_and_uppercase_extensions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    green = np.zeros((24, 30, 3), np.uint8)
    green[..., 1] = 200
    Image.fromarray(green).save(tmp_path / "a" / "scan.tif")
    Image.fromarray(green).save(tmp_path / "a" / "SCAN2.TIFF", compression="tiff_lzw")
    red, blue = Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 255))
    red.save(tmp_path / "b" / "anim.gif", save_all=True, append_images=[blue], duration=100, loop=0)
    with Image.open(tmp_path / "b" / "anim.gif") as im:
        assert im.n_frames == 2
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(tmp_path / "b" / "UP.JPG")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(tmp_path / "b" / "Mixed.Png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(tmp_path / "b" / "x.GIF")
    (tmp_path / "b" / "notes.TXT").write_text("not an image")
    names = sorted(p.name for p in find_images(tmp_path))
    assert names == ["Mixed.Png", "SCAN2.TIFF", "UP.JPG", "anim.gif", "scan.tif", "x.GIF"]
    for name in ("scan.tif", "SCAN2.TIFF"):
        x = as_tensor(tmp_path / "a" / name)
        assert x.shape == (3, 24, 30)
        torch.testing.assert_close(x.mean(dim=(1, 2)), torch.tensor([-1.0, 200 / 127.5 - 1, -1.0]))
    gif = as_tensor(tmp_path / "b" / "anim.gif")  # the first frame: red
    assert gif[0].min() > 0.95 and gif[2].max() < -0.95
    with caplog.at_level(logging.WARNING):
        dm = ArtFolderDataModule(str(tmp_path), image_size=8, batch_size=2, val_fraction=0)
        dm.setup()
    assert not dm.skipped and not [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(dm.train_set) == 6 and dm.classes == ["a", "b"]
    assert all(dm.train_set[i][0].shape == (3, 8, 8) for i in range(6))


def test_corrupt_file_skipped_once_by_name_and_unreadable_raises(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a").mkdir()
    Image.new("RGB", (10, 10), (1, 2, 3)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "Broken.TIF").write_bytes(b"II*\x00 not a tiff")
    with caplog.at_level(logging.WARNING):
        dm = ArtFolderDataModule(str(tmp_path), image_size=8, batch_size=1, val_fraction=0, cache=True,
                                 cache_dir=str(tmp_path / "cache"))
        dm.setup()
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "Broken.TIF" in warnings[0] and "skipped 1" in warnings[0]
    assert len(list((tmp_path / "cache" / "8px").glob("*.rgb"))) == 1  # only the good file is cached
    unchecked = ImageFolderDataset(tmp_path, find_images(tmp_path), to_unit_range(), image_size=8)
    with pytest.raises(OSError, match=r"cannot read image .*Broken\.TIF"):
        unchecked[0]


# --- draft decoding of large scans ------------------------------------------------------------------------------


def test_large_jpeg_decoded_at_reduced_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 6000 × 4000 px scan is decoded at 1/8 scale (750 × 500, still ≥ 2 × 64 px on the short side) before the
    resize to 64 px; same final shape, and the same picture as a full decode within a few levels."""
    h, w = 4000, 6000
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), 90)], axis=-1).astype(np.uint8)
    a[: h // 4, : w // 4] = (250, 250, 250)  # a bright patch in the top-left corner
    (tmp_path / "scans").mkdir()
    path = tmp_path / "scans" / "huge.jpg"
    Image.fromarray(a).save(path, quality=90)
    del a, yy, xx

    seen: list[tuple[int, int]] = []
    real_fit = image_io.fit

    def spy(image: Image.Image, size: int) -> Image.Image:
        seen.append(image.size)
        return real_fit(image, size)

    monkeypatch.setattr(image_io, "fit", spy)
    dm = ArtFolderDataModule(str(tmp_path), image_size=64, batch_size=1, val_fraction=0, hflip=False,
                             check_images=False)
    dm.setup()
    x = dm.train_set[0][0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert seen == [(750, 500)]  # 1/8 of 6000 × 4000 pixels: 1/64 of the decode
    assert min(seen[0]) >= image_io.DRAFT_MARGIN * 64
    full = decode(path)
    assert full.size == (w, h)
    reference = art_transform(64, 3, hflip=False)(real_fit(full, 64))
    assert (x - reference).abs().mean() < 0.02
    assert x[:, :12, :5].min() > 0.9  # the corner patch survives (the centre crop keeps its right 8 px columns)


# --- cache ------------------------------------------------------------------------------------------------------


def _folder(root: Path) -> list[Path]:
    rng = np.random.default_rng(1)
    (root / "p").mkdir(parents=True)
    paths = []
    for i, (hh, ww) in enumerate([(30, 50), (64, 40), (33, 33)]):
        p = root / "p" / f"{i}.{'png' if i else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, (hh, ww, 3), np.uint8)).save(p)
        paths.append(p)
    return paths


def test_cache_written_once_then_read_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _folder(tmp_path / "art")
    cache = tmp_path / "cache"
    decodes: list[Path] = []
    real_decode = image_io.decode

    def counting(path: Path, size: int | None = None) -> Image.Image:
        decodes.append(Path(path))
        return real_decode(path, size)

    monkeypatch.setattr(image_io, "decode", counting)
    args = {"root": str(tmp_path / "art"), "image_size": 16, "batch_size": 3, "val_fraction": 0, "hflip": False}
    plain = ArtFolderDataModule(**args)
    plain.setup()
    reference = torch.stack([plain.train_set.dataset[i][0] for i in range(3)])

    cached = ArtFolderDataModule(**args, cache=True, cache_dir=str(cache), check_images=False)
    cached.setup()
    decodes.clear()
    first = torch.stack([cached.train_set.dataset[i][0] for i in range(3)])  # epoch 1: decode and write
    assert len(decodes) == 3
    entries = [cache_path(cache, p, 16) for p in paths]
    assert all(e.is_file() for e in entries) and {e.parent for e in entries} == {cache / "16px"}
    key, image = read_cache_entry(entries[1])
    assert image.size == (16, 16) and image.mode == "RGB"
    assert key["source"] == str(paths[1].resolve()) and key["size"] == 16
    assert key["bytes"] == paths[1].stat().st_size and key["mtime_ns"] == paths[1].stat().st_mtime_ns
    decodes.clear()
    second = torch.stack([cached.train_set.dataset[i][0] for i in range(3)])  # epoch 2: from the cache
    assert decodes == []
    torch.testing.assert_close(first, reference, atol=LEVEL, rtol=0)
    torch.testing.assert_close(second, first, atol=LEVEL, rtol=0)
    # the DataLoader path gives the same batch
    batch = next(iter(cached.train_dataloader()))[0]
    assert batch.shape == (3, 3, 16, 16) and decodes == []

    # touching a file (same bytes, new mtime) invalidates its entry: decoded once more, then cached again
    st = paths[2].stat()
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    torch.testing.assert_close(cached.train_set.dataset[2][0], first[2], atol=LEVEL, rtol=0)
    assert decodes == [paths[2]]
    assert read_cache_entry(entries[2])[0]["mtime_ns"] == st.st_mtime_ns + 5_000_000_000
    decodes.clear()
    cached.train_set.dataset[2]
    assert decodes == []

    # modifying a file: the new picture, not the stale entry
    Image.new("RGB", (40, 30), (255, 255, 255)).save(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 9_000_000_000))
    changed = cached.train_set.dataset[1][0]
    assert decodes == [paths[1]] and changed.min() == 1  # all white now
    assert np.asarray(read_cache_entry(entries[1])[1]).min() == 255  # the entry was rewritten in place
    assert len(list((cache / "16px").iterdir())) == 3  # no stale entries, no temporary files

    # a damaged entry (e.g. a full disk) is rebuilt, not served
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    decodes.clear()
    torch.testing.assert_close(cached.train_set.dataset[0][0], first[0], atol=LEVEL, rtol=0)
    assert decodes == [paths[0]] and read_cache_entry(entries[0])[1].size == (16, 16)


def test_check_images_fills_the_cache_and_greyscale_uses_it(tmp_path: Path) -> None:
    paths = _folder(tmp_path / "art")
    cache = tmp_path / "cache"
    dm = ArtFolderDataModule(str(tmp_path / "art"), image_size=12, channels=1, batch_size=3, val_fraction=0,
                             cache=True, cache_dir=str(cache))
    dm.setup()  # check_images decodes every file once: the cache is full before the first batch
    assert all(cache_path(cache, p, 12).is_file() for p in paths)
    x = next(iter(dm.train_dataloader()))[0]
    assert x.shape == (3, 1, 12, 12) and x.min() >= -1 and x.max() <= 1


def test_cache_needs_a_dir_and_a_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.cache=true needs data\.cache_dir"):
        ArtFolderDataModule(str(tmp_path), cache=True, cache_dir=None)
    with pytest.raises(ValueError, match="needs the training size"):
        load_rgb(tmp_path / "x.png", None, tmp_path / "cache")
    dm = ArtFolderDataModule(str(tmp_path), cache=False, cache_dir=str(tmp_path / "c"))
    assert dm.cache_dir is None  # cache_dir alone (the config default) does not turn the cache on


def test_captioned_folder_reads_through_the_same_loader(tmp_path: Path) -> None:
    g = gradient16(64, 64)
    (tmp_path / "monet").mkdir()
    Image.fromarray(g).save(tmp_path / "monet" / "scan16.PNG")
    dm = CaptionedFolderDataModule(str(tmp_path), image_size=16, batch_size=1, instance_prompt="a {label}",
                                   cache=True, cache_dir=str(tmp_path / "cache"))
    dm.setup()
    image, caption = dm.train_set[0]
    assert caption == "a monet" and image.shape == (3, 16, 16)
    assert abs(image.mean().item()) < 0.05 and image.min() < -0.8  # a ramp, not white
    assert (tmp_path / "cache" / "16px").is_dir()


def test_fit_matches_the_training_transform() -> None:
    """Fitting first leaves art_transform's own resize and crop with nothing to do: same tensor either way."""
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (37, 53, 3), np.uint8))
    t = art_transform(16, 3, hflip=False)
    assert fit(image, 16).size == (16, 16)
    torch.testing.assert_close(t(fit(image, 16)), t(image), atol=0, rtol=0)
