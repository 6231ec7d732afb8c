"""Duplicate images in a folder (atelier.data.duplicates, ArtFolderDataModule(dedupe=True)): the same picture under
another name, re-encoded or copied into another subfolder, is found and kept out of the splits; distinct pictures
are not touched."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from atelier.data.art_folder import ArtFolderDataModule
from atelier.data.duplicates import DUPLICATE_RMS_LEVELS, duplicate_sources


def test_duplicate_sources_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (4, 8, 8, 3), generator=g, dtype=torch.uint8)
    near = (base[1].int() + torch.randint(-3, 4, (8, 8, 3), generator=g)).clamp(0, 255).to(torch.uint8)  # RMS ~2
    thumbs = torch.stack([base[0], base[1], base[0], near, base[2], base[3], near])
    assert duplicate_sources(thumbs).tolist() == [-1, -1, 0, 1, -1, -1, 1]
    # a chain: 2 matches 1 only, 1 matches 0 only; all point at 0
    row = torch.full((1, 1, 100), 100, dtype=torch.uint8)
    chain = torch.cat([row, row + 3, row + 6])  # RMS 3 between neighbours, 6 between the ends
    assert duplicate_sources(chain, tol=4).tolist() == [-1, 0, 0]
    assert duplicate_sources(chain, tol=0).tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match=r"tol=-1"):
        duplicate_sources(thumbs, tol=-1)


def _picture(seed: int, size: int = 48) -> Image.Image:
    """A distinct smooth 'painting': random colour blocks, upsampled (survives JPEG re-encoding closely)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (1, 3, 4, 4), generator=g).float()
    img = torch.nn.functional.interpolate(blocks, size=(size, size), mode="bilinear", align_corners=False)
    return Image.fromarray(img[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())


def test_dedupe_keeps_one_of_each_picture_out_of_both_splits(tmp_path: Path, caplog) -> None:
    root = tmp_path / "art"
    for artist in ("a", "b"):
        (root / artist).mkdir(parents=True)
    for i in range(10):
        _picture(i).save(root / ("a" if i % 2 else "b") / f"p{i:02d}.png")
    _picture(3).save(root / "a" / "p03-copy.png")                   # renamed copy
    _picture(4).save(root / "a" / "z-p04.jpg", quality=95)          # re-encoded, in the other artist's folder
    _picture(4).resize((64, 64)).save(root / "b" / "p04-large.png")  # larger scan of the same picture
    kwargs = {"image_size": 16, "batch_size": 4, "val_fraction": 0.3, "hflip": False, "check_images": False}
    plain = ArtFolderDataModule(str(root), **kwargs)
    plain.setup("fit")
    assert len(plain.train_set) + len(plain.val_set) == 13 and plain.duplicates == []

    with caplog.at_level(logging.WARNING, logger="atelier.data.art_folder"):
        dm = ArtFolderDataModule(str(root), dedupe=True, **kwargs)
        dm.setup("fit")
    dropped = {a.name: b.name for a, b in dm.duplicates}
    # the first in path order stays (a/ before b/, "p03-copy" before "p03")
    assert dropped == {"p03.png": "p03-copy.png", "p04-large.png": "z-p04.jpg", "p04.png": "z-p04.jpg"}
    assert "data.dedupe: dropped 3 of 13 images" in caplog.text
    full = dm.train_set.dataset
    names = [full.paths[i].name for i in [*dm.train_set.indices, *dm.val_set.indices]]
    assert len(names) == 10 == len(set(names)) and not set(names) & set(dropped)
    # no picture is in both splits: every kept image differs from every other by far more than the tolerance
    images = torch.stack([full[i][0] for i in range(len(full))])
    d = torch.cdist(images.flatten(1), images.flatten(1)) / images[0].numel() ** 0.5 * 127.5
    assert d[~torch.eye(len(d), dtype=torch.bool)].min() > DUPLICATE_RMS_LEVELS
