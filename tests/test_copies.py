"""The data-copying test (atelier.metrics.copies, scripts/nearest_neighbours.py): copies of training images are
found, fresh images are not, mirrored copies count when the data trains with flips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from atelier.callbacks.checkpoint_extras import CONFIG_KEY
from atelier.data.art_folder import ArtFolderDataModule
from atelier.metrics.copies import copy_report, nearest
from atelier.metrics.protocol import to_uint8
from tests.conftest import load_script


def test_nearest_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    query, ref = torch.randn(23, 5, generator=g), torch.randn(40, 5, generator=g)
    dist, idx = nearest(query, ref)
    full = torch.cdist(query.double(), ref.double())
    assert torch.equal(idx, full.argmin(1)) and torch.allclose(dist, full.min(1).values)
    with pytest.raises(ValueError, match=r"same D"):
        nearest(query, torch.randn(4, 6))


def test_copies_are_found_and_fresh_samples_are_not() -> None:
    g = torch.Generator().manual_seed(0)
    train, heldout = torch.randn(600, 8, generator=g), torch.randn(200, 8, generator=g)
    fresh = copy_report(torch.randn(300, 8, generator=g), train, heldout)
    assert abs(fresh.z_u) < 3 and fresh.close_fraction < 0.12 and fresh.p_value > 0.001  # about the 5 % quantile
    copies = copy_report(train[:300] + 1e-3 * torch.randn(300, 8, generator=g), train, heldout)
    assert copies.z_u < -10 and copies.close_fraction > 0.95
    assert torch.equal(copies.sample_indices, torch.arange(300))  # each copy's nearest is its original
    spread = copy_report(3 * torch.randn(300, 8, generator=g), train, heldout)  # further away than real data
    assert spread.z_u > 10 and spread.close_fraction == 0
    summary = copies.summary()
    assert summary["num_samples"] == 300 and summary["num_heldout"] == 200 and summary["median_ratio"] < 0.01
    with pytest.raises(ValueError, match=r"close_quantile=1.5"):
        copy_report(train[:10], train, heldout, close_quantile=1.5)


def _noise_folder(root: Path, n: int, size: int = 16) -> None:
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")


def _save_pngs(images: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, img in enumerate(to_uint8(images)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")


@pytest.mark.parametrize("space", ["pixels", "features"])
def test_script_flags_copied_and_mirrored_training_images(tmp_path: Path, space: str) -> None:
    script = load_script("nearest_neighbours")
    _noise_folder(tmp_path / "art", 48)
    data = {"_target_": "atelier.data.art_folder.ArtFolderDataModule", "root": str(tmp_path / "art"),
            "image_size": 16, "batch_size": 4, "val_fraction": 0.25, "hflip": True, "seed": 0, "num_workers": 0}
    ckpt = tmp_path / "last.ckpt"
    torch.save({CONFIG_KEY: {"data": data}}, ckpt)  # all the script reads from a checkpoint: the data config
    dm = ArtFolderDataModule(**{k: v for k, v in data.items() if k != "_target_"})
    dm.setup("fit")
    train = torch.stack([dm.train_set[i][0] for i in range(12)])
    _save_pngs(torch.cat([train[:6], train[6:].flip(-1)]), tmp_path / "copied")  # 6 as they are, 6 mirrored
    fresh_images = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    _save_pngs(fresh_images, tmp_path / "fresh")  # new noise pictures, like the folder's but none of them

    copied = script.main(["--samples", str(tmp_path / "copied"), "--ckpt", str(ckpt), "--space", space,
                          "--out", str(tmp_path / "out")])
    assert copied["num_train"] == 36 and copied["num_heldout"] == 12 and copied["mirrored_train"] is True
    # every copy nearer than every held-out image: U = 0, the floor of z_u for 12 against 12 (-4.16)
    assert copied["close_fraction"] == 1.0 and copied["sample_nn_median"] < 1e-3 and copied["z_u"] < -4.1
    assert json.loads((tmp_path / "out" / "copies.json").read_text())["z_u"] == copied["z_u"]
    with Image.open(tmp_path / "out" / "nearest.png") as grid:
        assert grid.width > 8 * 16 and grid.height > 16  # 12 pairs, 4 per row
    fresh = script.main(["--samples", str(tmp_path / "fresh"), "--ckpt", str(ckpt), "--space", space])
    assert fresh["close_fraction"] < 0.75 and abs(fresh["z_u"]) < 3 and fresh["sample_nn_median"] > 1
    assert fresh["feature_extractor"] == ("art_classifier" if space == "features" else None)


def test_script_names_a_sample_of_the_wrong_size(tmp_path: Path) -> None:
    script = load_script("nearest_neighbours")
    _save_pngs(torch.zeros(2, 3, 24, 24), tmp_path / "big")
    with pytest.raises(ValueError, match=r"00000.png is 24x24 px; the model's training images are 16x16"):
        script.load_samples(tmp_path / "big", 3, 16)
    with pytest.raises(FileNotFoundError, match=r"no images in"):
        script.load_samples(tmp_path, 3, 16)
