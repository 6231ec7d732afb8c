"""MNIST as a LightningDataModule on torchvision's ``MNIST``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, random_split
from torchvision.datasets import MNIST

from atelier.data.clusters import check_label_source, cluster_purity, kmeans_labels
from atelier.data.loaders import check_loader_settings, make_loader
from atelier.data.transforms import mnist_transform

log = logging.getLogger(__name__)

LABEL_SOURCES = ("digits", "kmeans")
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class MNISTDataModule(LightningDataModule):
    """MNIST digits as ``(image, label)``: image ``(channels, image_size, image_size)`` float32 in ``[-1, 1]``,
    label int64 in ``0..9`` (or a k-means cluster id, ``labels=kmeans``).

    Reads ``<data_dir>/MNIST/raw`` (torchvision's layout, ``.gz`` or uncompressed). Downloads only when those
    files are absent and ``download`` is true. The 60k training set is split into train/val with a generator
    seeded by ``seed``; ``test`` is the official 10k test set.

    Args:
        data_dir: folder that contains ``MNIST/raw`` (config key ``data.data_dir``, env ``ATELIER_DATA_DIR``).
        image_size: output size in px (28 native; 32 pads with 2 px of black; other sizes resize).
        channels: 1 (grey) or 3 (grey repeated).
        batch_size: images per batch.
        val_size: images held out of the training set for validation.
        num_workers: DataLoader workers.
        seed: seed of the train/val split.
        download: allow downloading when the files are absent.
        labels: ``digits`` (the MNIST labels) or ``kmeans``: the 60k training images' k-means cluster ids
            (:func:`atelier.data.clusters.kmeans_labels`, computed in ``setup`` without the digit labels, seeded
            by ``seed``) replace the labels of the train and val splits, for self-labelled conditioning; the test
            set keeps its digits. ``num_classes`` is then ``num_clusters``.
        num_clusters: clusters for ``labels=kmeans``.

    Raises:
        ValueError: for ``channels`` not in (1, 3), ``batch_size`` or ``image_size`` < 1, ``num_workers`` < 0, or
            ``labels`` not in (digits, kmeans).
        FileNotFoundError: when the files are absent and ``download`` is false, naming the folder and the key.
    """

    def __init__(
        self,
        data_dir: str = "data",
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        seed: int = 0,
        download: bool = True,
        pin_memory: bool = False,
        labels: str = "digits",
        num_clusters: int = 100,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels} is not allowed for MNIST; choose 1 or 3")
        check_loader_settings(batch_size, num_workers, image_size)
        if not 0 < val_size < 60000:
            raise ValueError(f"data.val_size must be in 1..59999, got {val_size}")
        check_label_source(labels, LABEL_SOURCES, num_clusters)
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir).expanduser()
        self.transform = mnist_transform(image_size, channels)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """Classes of the labels the batches carry: 10 digits, or ``num_clusters`` for ``labels=kmeans``."""
        return int(self.hparams.num_clusters) if self.hparams.labels == "kmeans" else 10

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "MNIST" / "raw"

    def files_present(self) -> bool:
        return all((self.raw_dir / f).exists() or (self.raw_dir / f"{f}.gz").exists() for f in RAW_FILES)

    def prepare_data(self) -> None:
        if self.files_present():
            # torchvision reads the uncompressed files; it extracts the .gz ones on its own when needed.
            if not all((self.raw_dir / f).exists() for f in RAW_FILES):
                MNIST(str(self.data_dir), train=True, download=True)
            return
        if not self.hparams.download:
            raise FileNotFoundError(
                f"MNIST files not found in {self.raw_dir} (expected {', '.join(RAW_FILES)}). Set data.data_dir "
                f"(or the ATELIER_DATA_DIR environment variable) to the folder that holds MNIST/raw, or set "
                f"data.download=true."
            )
        log.info("MNIST not found in %s: downloading", self.raw_dir)
        try:
            MNIST(str(self.data_dir), train=True, download=True)
            MNIST(str(self.data_dir), train=False, download=True)
        except Exception as err:  # torchvision raises RuntimeError/URLError variants
            raise RuntimeError(
                f"MNIST is not in {self.raw_dir} and could not be downloaded ({err}). Put the four MNIST files "
                f"there or set data.data_dir / ATELIER_DATA_DIR to a folder that has them."
            ) from err

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.files_present():
            self.prepare_data()
        full = MNIST(str(self.data_dir), train=True, transform=self.transform, download=False)
        if self.hparams.labels == "kmeans":
            digits = full.targets
            full.targets = kmeans_labels(full.data, self.hparams.num_clusters, seed=self.hparams.seed)
            log.info("data.labels=kmeans: %d k-means clusters of the 60k training images replace the digit labels "
                     "(purity against the digits %.3f, a diagnostic: the digits are not used)",
                     self.hparams.num_clusters, cluster_purity(full.targets, digits))
        n_val = self.hparams.val_size
        generator = torch.Generator().manual_seed(self.hparams.seed)
        self.train_set, self.val_set = random_split(full, [len(full) - n_val, n_val], generator=generator)
        self.test_set = MNIST(str(self.data_dir), train=False, transform=self.transform, download=False)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return make_loader(dataset, hp.batch_size, shuffle, hp.num_workers, hp.pin_memory)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
