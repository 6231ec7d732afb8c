"""A folder of images (e.g. paintings, one subfolder per artist) as a LightningDataModule."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset, random_split

from atelier.data.clusters import check_label_source, cluster_purity, feature_vectors, kmeans_labels
from atelier.data.duplicates import duplicate_sources
from atelier.data.image_io import IMAGE_EXTENSIONS, find_images, load_rgb, split_readable
from atelier.data.loaders import check_loader_settings, make_loader
from atelier.data.transforms import art_transform

log = logging.getLogger(__name__)

# re-exported: the folder readers (style images, restoration inputs) import them from here
__all__ = ["IMAGE_EXTENSIONS", "ArtFolderDataModule", "ImageFolderDataset", "find_images", "split_readable"]

LABEL_SOURCES = ("folders", "kmeans")
#: what data.labels=kmeans clusters: the pixels, or the penultimate features of the pinned art classifier
CLUSTER_SPACES = ("pixels", "art_features")
#: thumbnail size (px) at which data.dedupe compares images
DEDUPE_SIZE = 32


def fitted_pixels(paths: list[Path], size: int, cache_dir: Path | None = None) -> torch.Tensor:
    """``(N, size, size, 3)`` uint8 in ``[0, 255]``: each file read by :func:`atelier.data.image_io.load_rgb` and
    fitted to ``size`` px (through the image cache when ``cache_dir`` is given).

    Raises:
        atelier.data.image_io.UnreadableImageError: for a file that cannot be decoded, naming it.
    """
    return torch.from_numpy(np.stack([np.asarray(load_rgb(p, size, cache_dir)) for p in paths]))


class ImageFolderDataset(Dataset):
    """``(image, label)`` pairs from image paths; label = index of the file's top-level subfolder.

    Every file is read by :func:`atelier.data.image_io.load_rgb`: EXIF orientation applied, 16-bit images scaled
    (not clipped) to 8 bits, any mode converted to RGB (transparency on white). With ``image_size`` the image is
    fitted to ``image_size × image_size`` (short side resized, centre crop; JPEGs decoded at reduced scale) before
    ``transform``, and with ``cache_dir`` as well the fitted image is cached on disk (see
    :mod:`atelier.data.image_io`).

    Args:
        root: the folder (labels come from the top-level subfolders below it).
        paths: image files under ``root``.
        transform: PIL ``RGB`` image → sample (e.g. :func:`atelier.data.transforms.art_transform`, giving
            ``(C, H, W)`` float32 in ``[-1, 1]``); ``None`` returns the PIL image.
        image_size: training size in px (``None``: full-size images).
        cache_dir: cache folder of fitted images (needs ``image_size``; ``None``: no cache).

    Raises:
        atelier.data.image_io.UnreadableImageError: from ``__getitem__``, for a file that cannot be decoded
            (an ``OSError`` naming the file).
    """

    def __init__(self, root: Path, paths: list[Path], transform: Callable | None = None,
                 image_size: int | None = None, cache_dir: str | Path | None = None) -> None:
        self.root = root
        self.paths = paths
        self.transform = transform
        self.image_size = image_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
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
        image = load_rgb(self.paths[i], self.image_size, self.cache_dir)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[i]


class ArtFolderDataModule(LightningDataModule):
    """Images under ``root`` as ``(image, label)``: image ``(channels, image_size, image_size)`` float32 in
    ``[-1, 1]``, label int64 (subfolder index; one class when there are no subfolders).

    Every ``jpg/jpeg/png/webp/bmp/tif/tiff/gif`` file under ``root`` is used (recursive; extensions in any case).
    Files are read by :func:`atelier.data.image_io.load_rgb`: EXIF orientation applied, 16-bit images scaled to
    8 bits, GIFs' first frame, any mode converted to RGB, large JPEGs decoded at reduced scale; then resized
    (short side) and centre-cropped to ``image_size``, and flipped horizontally at random for training.
    Unreadable or corrupt files are skipped and reported once (count and names) at setup.

    With ``labels=kmeans`` the label is not the subfolder but the image's k-means cluster
    (:func:`atelier.data.clusters.kmeans_labels`, all files, seeded by ``seed``; the same ids at any training size),
    for self-labelled conditioning (Hu et al. 2023). ``cluster_space=pixels`` clusters the pixels of the images fitted
    to ``cluster_image_size`` px (groups of palette and layout); ``cluster_space=art_features`` clusters the unit-
    length penultimate features of the art classifier (:class:`~atelier.metrics.art_features.ArtClassifierFeatures`,
    always the pinned weights, so that an evaluation re-clusters to the same ids; the images are fitted to its input
    size), which groups subjects as well (on the shared paintings one cluster gathers the portraits and peasant
    figures). ``num_classes`` is then ``num_clusters`` and ``classes`` are ``cluster00, cluster01, ...``. One log
    line gives the clusters' purity against the subfolders (a diagnostic; the subfolders are not used).

    With ``cache`` the fitted ``image_size`` px images (before flips) are written once as PNGs under
    ``cache_dir/<image_size>px/`` and read from there afterwards; an entry is rebuilt when its file's size or
    mtime changes. Worth it when decoding dominates the step time (large scans, TIFFs).

    Args:
        root: image folder (config key ``data.root``).
        image_size: output size in px.
        channels: 3 (RGB) or 1 (greyscale).
        batch_size: images per batch.
        val_fraction: share of images held out for validation (seeded split).
        num_workers: DataLoader workers.
        seed: seed of the train/val split.
        hflip: random horizontal flips for training.
        check_images: decode every file at setup to find corrupt ones (costs ~1 ms per small image; with
            ``cache`` this check fills the cache, and later runs read the cached entries).
        pin_memory: DataLoader ``pin_memory``.
        cache: cache the fitted images on disk (config key ``data.cache``).
        cache_dir: the cache folder (config key ``data.cache_dir``; ``configs/data/art.yaml``:
            ``${paths.log_dir}/image_cache``).
        labels: ``folders`` (the subfolder index) or ``kmeans`` (cluster ids, see above).
        num_clusters: clusters for ``labels=kmeans``.
        cluster_image_size: the size in px the images are clustered at for ``labels=kmeans`` and
            ``cluster_space=pixels``.
        cluster_space: what ``labels=kmeans`` clusters: ``pixels`` or ``art_features`` (see above).
        keep_labels: train and validate on these classes only (folder names or indices with ``labels=folders``,
            cluster ids with ``labels=kmeans``; the clusters are still formed on every image, so the ids stay
            those of the whole folder); the kept classes are renumbered ``0..len(keep_labels) - 1`` in the given
            order. ``None``: all. E.g. ``data.labels=kmeans data.cluster_space=art_features data.keep_labels=[10]``
            trains on the shared paintings' figure cluster alone.
        dedupe: before the split, drop every image that duplicates an earlier one (sorted paths; 32 px thumbnails
            within :data:`atelier.data.duplicates.DUPLICATE_RMS_LEVELS`), so no picture sits in both splits;
            the dropped files and what they duplicate are logged and kept in ``duplicates``.

    Raises:
        FileNotFoundError: when ``root`` does not exist or holds no readable image, naming the path.
        ValueError: for ``channels`` not in (1, 3), ``batch_size`` or ``image_size`` < 1, ``num_workers`` < 0, a
            ``val_fraction`` outside ``[0, 1)``, ``cache`` without a ``cache_dir``, ``labels`` not in (folders,
            kmeans), ``cluster_space`` not in (pixels, art_features), ``num_clusters`` outside ``[2, 1000]`` (and,
            at setup, above the number of images), an empty ``keep_labels`` or (at setup) one that names no class.
        OSError: when ``cache_dir`` cannot be written (at setup with ``check_images``, else while loading).
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
        cache: bool = False,
        cache_dir: str | None = None,
        labels: str = "folders",
        num_clusters: int = 30,
        cluster_image_size: int = 32,
        dedupe: bool = False,
        cluster_space: str = "pixels",
        keep_labels: Sequence[int | str] | None = None,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels} is not allowed; choose 1 or 3")
        check_loader_settings(batch_size, num_workers, image_size)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if cache and not cache_dir:
            raise ValueError("data.cache=true needs data.cache_dir (a writable folder for the resized images)")
        check_label_source(labels, LABEL_SOURCES, num_clusters)
        if cluster_space not in CLUSTER_SPACES:
            raise ValueError(f"data.cluster_space={cluster_space!r} is not allowed; choose one of "
                             f"{list(CLUSTER_SPACES)}")
        if keep_labels is not None and len(keep_labels) == 0:
            raise ValueError("data.keep_labels=[] keeps nothing; list classes to keep, or null for all")
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.cache_dir = Path(cache_dir).expanduser() if cache and cache_dir else None
        self.skipped: list[Path] = []
        self.duplicates: list[tuple[Path, Path]] = []
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.classes: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={self.root} does not exist or is not a folder")
        hp = self.hparams
        paths = find_images(self.root)
        if hp.check_images:
            paths, self.skipped = split_readable(paths, hp.image_size, self.cache_dir)
            if self.skipped:
                names = ", ".join(str(p.relative_to(self.root)) for p in self.skipped[:50])
                more = f" (+{len(self.skipped) - 50} more)" if len(self.skipped) > 50 else ""
                log.warning("skipped %d unreadable image file(s) under %s: %s%s", len(self.skipped), self.root,
                            names, more)
        if not paths:
            raise FileNotFoundError(
                f"data.root={self.root} holds no readable image ({', '.join(IMAGE_EXTENSIONS)}, any case, "
                "searched recursively)"
            )
        if hp.dedupe:
            paths = self._drop_duplicates(paths)
        if self.cache_dir is not None:
            log.info("image cache for %s at %d px: %s", self.root, hp.image_size, self.cache_dir / f"{hp.image_size}px")
        size, cache = hp.image_size, self.cache_dir
        train_full = ImageFolderDataset(self.root, paths, art_transform(size, hp.channels, hp.hflip), size, cache)
        val_full = ImageFolderDataset(self.root, paths, art_transform(size, hp.channels, hflip=False), size, cache)
        self.classes = train_full.classes
        if hp.labels == "kmeans":
            self._use_clusters(paths, train_full, val_full)
        kept = list(range(len(paths)))
        if hp.keep_labels is not None:
            kept = self._keep(list(hp.keep_labels), train_full, val_full)
        n_val = round(len(kept) * hp.val_fraction)
        if n_val == 0 or n_val >= len(kept):
            n_val = min(1, len(kept) - 1) if hp.val_fraction > 0 else 0
        generator = torch.Generator().manual_seed(hp.seed)
        train_pos, val_pos = random_split(range(len(kept)), [len(kept) - n_val, n_val], generator=generator)
        train_idx, val_idx = [kept[i] for i in train_pos], [kept[i] for i in val_pos]
        self.train_set = Subset(train_full, train_idx)
        self.val_set = Subset(val_full, val_idx) if n_val else Subset(val_full, train_idx[:1])

    def _keep(self, wanted: list[int | str], *datasets: ImageFolderDataset) -> list[int]:
        """Indices of the images whose class is in ``wanted`` (names or indices of ``self.classes``); renumbers the
        kept classes ``0..len(wanted) - 1`` in ``datasets`` (same images) and ``self.classes``."""
        ids = []
        for w in wanted:
            if isinstance(w, str) and w in self.classes:
                ids.append(self.classes.index(w))
            elif isinstance(w, int) and 0 <= w < len(self.classes):
                ids.append(w)
            else:
                raise ValueError(f"data.keep_labels: {w!r} is not a class here; choose names of {self.classes} "
                                 f"or indices 0..{len(self.classes) - 1}")
        new_id = {old: new for new, old in enumerate(dict.fromkeys(ids))}
        kept = [i for i, t in enumerate(datasets[0].targets) if t in new_id]
        for dataset in datasets:
            dataset.targets = [new_id.get(t, -1) for t in dataset.targets]
            dataset.classes = [self.classes[old] for old in new_id]
        self.classes = datasets[0].classes
        log.info("data.keep_labels=%s: %d of %d images in %d class(es) %s", list(wanted), len(kept),
                 len(datasets[0].targets), len(self.classes), self.classes)
        return kept

    def _drop_duplicates(self, paths: list[Path]) -> list[Path]:
        """``paths`` without the images that duplicate an earlier one (``self.duplicates``: (dropped, kept))."""
        source = duplicate_sources(fitted_pixels(paths, DEDUPE_SIZE, self.cache_dir))
        self.duplicates = [(paths[i], paths[int(j)]) for i, j in enumerate(source.tolist()) if j >= 0]
        if self.duplicates:
            shown = ", ".join(f"{a.relative_to(self.root)} = {b.relative_to(self.root)}"
                              for a, b in self.duplicates[:5])
            log.warning("data.dedupe: dropped %d of %d images under %s that duplicate another (%s%s)",
                        len(self.duplicates), len(paths), self.root, shown,
                        ", ..." if len(self.duplicates) > 5 else "")
        return [p for p, j in zip(paths, source.tolist(), strict=True) if j < 0]

    def _use_clusters(self, paths: list[Path], *datasets: ImageFolderDataset) -> None:
        """Replace the folder labels of ``datasets`` (same ``paths``) by k-means cluster ids."""
        hp = self.hparams
        if hp.num_clusters > len(paths):
            raise ValueError(f"data.num_clusters={hp.num_clusters} exceeds the {len(paths)} images under {self.root}")
        if hp.cluster_space == "art_features":
            from atelier.metrics.art_features import ArtClassifierFeatures  # only this choice needs the classifier

            extractor = ArtClassifierFeatures()
            points = feature_vectors(extractor, fitted_pixels(paths, extractor.input_size, self.cache_dir))
            space = f"art-classifier features {extractor.weights_sha256}"
            n_init = 10  # cheap on 128 sparse features, and steadier clusters than 3 restarts
        else:
            points = fitted_pixels(paths, hp.cluster_image_size, self.cache_dir)
            space = f"pixels at {hp.cluster_image_size} px"
            n_init = 3  # as since stop 37: checkpoints re-cluster at evaluation and must get the same ids
        clusters = kmeans_labels(points, hp.num_clusters, seed=hp.seed, n_init=n_init)
        purity = cluster_purity(clusters, torch.as_tensor(datasets[0].targets))
        for dataset in datasets:
            dataset.targets = clusters.tolist()
            dataset.classes = [f"cluster{i:02d}" for i in range(hp.num_clusters)]
        self.classes = datasets[0].classes
        log.info("data.labels=kmeans: %d k-means clusters of the %d images (%s) replace the folder labels "
                 "(purity against the folders %.3f, a diagnostic: the folders are not used)", hp.num_clusters,
                 len(paths), space, purity)

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
