"""Fixtures for the Stable Diffusion tests: the tiny random-weight model (built once per session) and a small
folder of captioned images. Import the fixtures into a test module to use them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atelier.text2image.tiny import save_tiny_model


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.x-style pipeline directory (random weights, 32 px images, CLIP in ``clip/``)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def caption_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 40 px RGB images in two subfolders (``monet``, ``sisley``); the ``monet`` ones have sidecar captions."""
    root = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    for label in ("monet", "sisley"):
        (root / label).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i:02d}.png")
            if label == "monet":
                (root / label / f"{i:02d}.txt").write_text(f"a harbour painting number {i}\n")
    return root


@pytest.fixture(scope="session")
def init_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 50 px RGB gradient image for image-to-image."""
    path = tmp_path_factory.mktemp("init") / "photo.png"
    ramp = np.linspace(0, 255, 50, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (50, 1)), np.tile(ramp[:, None], (1, 50)),
                              np.full((50, 50), 128, np.uint8)], axis=-1)).save(path)
    return path


#: (width, height) of the images of :func:`bucket_dir`: two landscape, two portrait, two near-square
BUCKET_SIZES = ((48, 32), (50, 30), (32, 48), (30, 50), (40, 40), (44, 40))


@pytest.fixture(scope="session")
def bucket_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six RGB images of mixed aspect ratios (:data:`BUCKET_SIZES`) in one folder, each with a sidecar caption of
    comma-separated tags (``"style{i}, red, blue, green, yellow"``)."""
    root = tmp_path_factory.mktemp("buckets")
    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate(BUCKET_SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"style{i}, red, blue, green, yellow\n")
    return root
