"""DreamBooth class images (prior preservation, Ruiz et al. 2023): the images of the class that
:class:`atelier.data.captioned_folder.CaptionedFolderDataModule` reads from ``class_data_dir``, and their one-off
generation by the base model, cached there as ``class_XXXXX.png`` for later runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from atelier.data.art_folder import find_images

#: ``generate(prompts, seeds) -> PIL images``, e.g. the base pipeline of the LoRA module
ImageGenerator = Callable[[Sequence[str], Sequence[int]], list[Image.Image]]


def find_class_images(class_dir: Path | None, limit: int) -> list[Path]:
    """The cached class images in ``class_dir`` (at most ``limit``), sorted; ``[]`` when there is no folder."""
    if class_dir is None or not class_dir.is_dir():
        return []
    return find_images(class_dir)[:limit]


def generate_class_images(class_dir: Path, prompt: str, first: int, total: int, generate: ImageGenerator,
                          batch_size: int = 4) -> None:
    """Generate class images ``first .. total - 1`` of ``prompt`` with ``generate(prompts, seeds)`` (seed = image
    index), ``batch_size`` per call, and save them as ``class_XXXXX.png`` (the index) in ``class_dir``."""
    class_dir.mkdir(parents=True, exist_ok=True)
    for start in range(first, total, batch_size):
        seeds = list(range(start, min(start + batch_size, total)))
        for seed, image in zip(seeds, generate([prompt] * len(seeds), seeds), strict=True):
            image.save(class_dir / f"class_{seed:05d}.png")
