"""Datamodules on the real MNIST files and on an image folder written by the test (with a corrupt file)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.data.art_folder import ArtFolderDataModule
from atelier.data.mnist import MNISTDataModule


@pytest.mark.parametrize(("image_size", "channels"), [(28, 1), (32, 1), (16, 3)])
def test_mnist_batches(mnist_available: Path, image_size: int, channels: int) -> None:
    dm = MNISTDataModule(str(mnist_available), image_size=image_size, channels=channels, batch_size=16,
                         val_size=1000, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 59000 and len(dm.val_set) == 1000 and len(dm.test_set) == 10000
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, channels, image_size, image_size)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    assert x.min() == -1 and x.max() > 0.9  # black background, white strokes
    assert y.min() >= 0 and y.max() <= 9
    if image_size == 32:
        assert torch.all(x[:, :, :2, :] == -1)  # 2 px of black padding


def test_mnist_split_is_seeded(mnist_available: Path) -> None:
    a = MNISTDataModule(str(mnist_available), seed=3, download=False)
    b = MNISTDataModule(str(mnist_available), seed=3, download=False)
    c = MNISTDataModule(str(mnist_available), seed=4, download=False)
    for dm in (a, b, c):
        dm.setup()
    assert a.val_set.indices == b.val_set.indices
    assert a.val_set.indices != c.val_set.indices


def test_mnist_missing_dir_names_path_and_key(tmp_path: Path) -> None:
    dm = MNISTDataModule(str(tmp_path / "nowhere"), download=False)
    with pytest.raises(FileNotFoundError, match=r"nowhere/MNIST/raw.*data\.data_dir"):
        dm.prepare_data()


def test_mnist_bad_channels() -> None:
    with pytest.raises(ValueError, match=r"data\.channels=2"):
        MNISTDataModule("x", channels=2)


@pytest.mark.parametrize("module", ["mnist", "art", "captioned"])
@pytest.mark.parametrize(("key", "value", "low"), [("batch_size", 0, 1), ("batch_size", 16.0, 1),
                                                   ("num_workers", -1, 0), ("image_size", 0, 1)])
def test_bad_loader_settings_are_refused_at_construction_naming_the_key(module: str, key: str, value: object,
                                                                         low: int) -> None:
    """Before any file is read (the folder does not exist), not deep inside the first DataLoader."""
    from atelier.data.captioned_folder import CaptionedFolderDataModule

    make = {"mnist": MNISTDataModule, "art": ArtFolderDataModule, "captioned": CaptionedFolderDataModule}[module]
    with pytest.raises(ValueError, match=rf"data\.{key}={value!r} is not allowed; it must be an integer >= {low}"):
        make("/nonexistent", **{key: value})
    make("/nonexistent", batch_size=1, num_workers=0, image_size=8)  # the smallest allowed values pass


def _write_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for artist, n in (("monet", 5), ("sisley", 4)):
        (root / artist).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / artist / f"{i}.jpg")
    # odd modes: greyscale PNG, RGBA PNG, CMYK JPEG, in a nested folder
    (root / "sisley" / "nested").mkdir()
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(root / "sisley" / "nested" / "g.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 4), dtype=np.uint8), "RGBA").save(root / "monet" / "a.png")
    Image.new("CMYK", (33, 31), (10, 20, 30, 40)).save(root / "monet" / "c.jpg")
    (root / "monet" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "monet" / "notes.txt").write_text("not an image")


def test_art_folder_batches_and_corrupt_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_folder(tmp_path)
    dm = ArtFolderDataModule(str(tmp_path), image_size=16, batch_size=4, val_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert [p.name for p in dm.skipped] == ["broken.jpg"]
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0] and "skipped 1" in warnings[0]
    assert dm.classes == ["monet", "sisley"]
    assert len(dm.train_set) + len(dm.val_set) == 12  # 5 + 4 jpg, grey, RGBA, CMYK
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert set(y.tolist()) <= {0, 1}
    # every image, whatever its mode, comes out as 3 x 16 x 16
    for i in range(len(dm.val_set)):
        assert dm.val_set[i][0].shape == (3, 16, 16)


def test_art_folder_greyscale_channels(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    dm = ArtFolderDataModule(str(tmp_path), image_size=8, channels=1, batch_size=2)
    dm.setup()
    assert next(iter(dm.train_dataloader()))[0].shape == (2, 1, 8, 8)


def test_art_folder_missing_and_empty_roots(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.root=.*missing"):
        ArtFolderDataModule(str(tmp_path / "missing")).setup()
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "x.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"empty.*no readable image"):
        ArtFolderDataModule(str(tmp_path / "empty")).setup()


def test_real_art_folder_loads(mnist_available: Path) -> None:
    root = mnist_available / "art"
    dm = ArtFolderDataModule(str(root), image_size=32, batch_size=8, check_images=False)
    dm.setup()
    assert dm.classes == ["monet", "pissarro", "sisley"]
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
