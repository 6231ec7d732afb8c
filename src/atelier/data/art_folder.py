"""A folder of images (e.g. paintings, one subfolder per artist) as a LightningDataModule."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from lightning import LightningDataModule
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset, random_split

from atelier.data.loaders import make_loader
from atelier.data.transforms import art_transform

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def find_images(root: Path) -> list[Path]:
    """Every file under ``root`` (recursive) whose extension is in :data:`IMAGE_EXTENSIONS`, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def split_readable(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Decode every image once; return ``(readable, unreadable)`` paths."""
    good, bad = [], []
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as im:
                    im.load()
            good.append(path)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            bad.append(path)
    return good, bad


class ImageFolderDataset(Dataset):
    """``(image, label)`` pairs from image paths; label = index of the file's top-level subfolder.

    Images of any mode (grey, RGBA, CMYK, palette) are converted to RGB before ``transform``.
    """

    def __init__(self, root: Path, paths: list[Path], transform: Callable | None = None) -> None:
        self.root = root
        self.paths = paths
        self.transform = transform
        names = [self.class_name(p) for p in paths]
        self.classes = sorted(set(names))
        index = {c: i for i, c in enumerate(self.classes)}
        self.targets = [index[c] for c in names]

    def class_name(self, path: Path) -> str:
        parts = path.relative_to(self.root).parts
        return parts[0] if len(parts) > 1 else "."

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise OSError(f"cannot read image {path}: {err}") from err
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[i]


class ArtFolderDataModule(LightningDataModule):
    """Images under ``root`` as ``(image, label)``: image ``(channels, image_size, image_size)`` float32 in
    ``[-1, 1]``, label int64 (subfolder index; one class when there are no subfolders).

    Every ``jpg/jpeg/png/webp/bmp`` file under ``root`` is used (recursive). Images are converted to RGB,
    resized (short side) and centre-cropped to ``image_size``, and flipped horizontally at random for training.
    Unreadable or corrupt files are skipped and reported once (count and names) at setup.

    Args:
        root: image folder (config key ``data.root``).
        image_size: output size in px.
        channels: 3 (RGB) or 1 (greyscale).
        batch_size: images per batch.
        val_fraction: share of images held out for validation (seeded split).
        num_workers: DataLoader workers.
        seed: seed of the train/val split.
        hflip: random horizontal flips for training.
        check_images: decode every file at setup to find corrupt ones (costs ~1 ms per small image).

    Raises:
        FileNotFoundError: when ``root`` does not exist or holds no readable image, naming the path.
        ValueError: for ``channels`` not in (1, 3) or a ``val_fraction`` outside ``[0, 1)``.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        channels: int = 3,
        batch_size: int = 64,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
        hflip: bool = True,
        check_images: bool = True,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels} is not allowed; choose 1 or 3")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.skipped: list[Path] = []
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.classes: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={self.root} does not exist or is not a folder")
        paths = find_images(self.root)
        if self.hparams.check_images:
            paths, self.skipped = split_readable(paths)
            if self.skipped:
                names = ", ".join(str(p.relative_to(self.root)) for p in self.skipped[:50])
                more = f" (+{len(self.skipped) - 50} more)" if len(self.skipped) > 50 else ""
                log.warning("skipped %d unreadable image file(s) under %s: %s%s", len(self.skipped), self.root,
                            names, more)
        if not paths:
            raise FileNotFoundError(
                f"data.root={self.root} holds no readable image ({', '.join(IMAGE_EXTENSIONS)}, searched recursively)"
            )
        hp = self.hparams
        train_full = ImageFolderDataset(self.root, paths, art_transform(hp.image_size, hp.channels, hp.hflip))
        val_full = ImageFolderDataset(self.root, paths, art_transform(hp.image_size, hp.channels, hflip=False))
        self.classes = train_full.classes
        n_val = round(len(paths) * hp.val_fraction)
        if n_val == 0 or n_val >= len(paths):
            n_val = min(1, len(paths) - 1) if hp.val_fraction > 0 else 0
        generator = torch.Generator().manual_seed(hp.seed)
        train_idx, val_idx = random_split(range(len(paths)), [len(paths) - n_val, n_val], generator=generator)
        self.train_set = Subset(train_full, list(train_idx))
        self.val_set = Subset(val_full, list(val_idx)) if n_val else Subset(val_full, list(train_idx)[:1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return make_loader(dataset, hp.batch_size, shuffle, hp.num_workers, hp.pin_memory)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
