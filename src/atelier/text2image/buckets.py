"""Aspect-ratio bucketing (NovelAI 2022; kohya-ss's ``enable_bucket``): train on whole paintings instead of square
centre crops.

Buckets are ``(width, height)`` pairs, both multiples of ``step``, of about equal area (at most ``base²``): for
``base`` 512 and ``step`` 64 with ``max_ratio`` 2 they are 512×512, 576×448, 448×576, 640×384 and 384×640. Every
image goes to the bucket whose aspect ratio is nearest to its own in log space (:func:`assign_bucket`), is resized to
cover it (the smallest scale at which both sides reach the bucket's) and centre-cropped to it
(:func:`fit_to_bucket`), so at most the aspect-ratio difference is cropped away. A batch is drawn from one bucket
(:class:`BucketBatchSampler`), so its images share a shape.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, Sampler
from torchvision.transforms import v2

from atelier.data.image_io import READ_ERRORS, UnreadableImageError, decode, fit

log = logging.getLogger(__name__)

Bucket = tuple[int, int]  # (width, height) in px
#: EXIF orientations that swap width and height (transpose, 90° rotations, transverse)
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def make_buckets(base: int = 512, step: int = 64, max_ratio: float = 2.0) -> list[Bucket]:
    """The bucket table: ``(width, height)`` pairs, multiples of ``step``, with ``width · height <= base²`` and the
    long side at most ``max_ratio`` times the short one, sorted by aspect ratio ``width / height`` (ascending).

    For each width ``w = step, 2·step, ...`` the height is the largest multiple of ``step`` with ``w·h <= base²``
    (kohya's rule); each landscape bucket has its portrait twin; ``base × base`` is always in it (``base`` a
    multiple of ``step``).

    Raises:
        ValueError: for ``step < 1``, ``base`` not a positive multiple of ``step`` or ``max_ratio < 1``.
    """
    if step < 1 or base < step or base % step:
        raise ValueError(f"bucket base {base} px must be a positive multiple of the bucket step {step} px")
    if max_ratio < 1:
        raise ValueError(f"bucket max_ratio must be >= 1, got {max_ratio}")
    area = base * base
    found: set[Bucket] = {(base, base)}
    for w in range(base, int(base * math.sqrt(max_ratio)) + step + 1, step):
        h = (area // w) // step * step
        if h >= step and w / h <= max_ratio:
            found.update({(w, h), (h, w)})
    return sorted(found, key=lambda b: b[0] / b[1])


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket whose aspect ratio is nearest to ``width / height`` (in log ratio; ties: the first).

    Raises:
        ValueError: for an empty bucket table or a non-positive size.
    """
    if not buckets:
        raise ValueError("the bucket table is empty")
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} is not positive")
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - target))


def bucket_tolerance(buckets: Sequence[Bucket], index: int) -> tuple[float, float]:
    """The range ``(low, high)`` of log aspect ratios ``log(w / h)`` that :func:`assign_bucket` sends to bucket
    ``index``: halfway to its neighbours (unbounded at the ends of the table)."""
    logs = sorted(math.log(w / h) for w, h in buckets)
    own = math.log(buckets[index][0] / buckets[index][1])
    k = logs.index(own)
    low = (logs[k - 1] + own) / 2 if k > 0 else -math.inf
    high = (logs[k + 1] + own) / 2 if k + 1 < len(logs) else math.inf
    return low, high


def upright_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of the image at ``path`` after EXIF orientation (what :func:`load_bucketed` sees), from
    the file's header only (no decoding).

    Raises:
        atelier.data.image_io.UnreadableImageError: when Pillow cannot open the file (naming it).
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112)
    except READ_ERRORS as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Resize ``image`` to cover ``bucket`` (scale ``max(bw / w, bh / h)``, antialiased bilinear) and centre-crop it
    to ``bucket`` = ``(width, height)``. A square bucket uses :func:`atelier.data.image_io.fit` (exactly the
    square training path)."""
    bw, bh = bucket
    if bw == bh:
        return fit(image, bw)
    w, h = image.size
    scale = max(bw / w, bh / h)
    size = [max(bh, round(h * scale)), max(bw, round(w * scale))]
    return v2.functional.center_crop(v2.functional.resize(image, size, antialias=True), [bh, bw])


def load_bucketed(path: str | Path, bucket: Bucket) -> Image.Image:
    """The image at ``path`` read as :func:`atelier.data.image_io.load_rgb` does (EXIF orientation, 8-bit RGB,
    JPEG draft decoding at the bucket's long side) and fitted to ``bucket`` (:func:`fit_to_bucket`).

    Raises:
        atelier.data.image_io.UnreadableImageError: when the file cannot be decoded (naming it).
    """
    return fit_to_bucket(decode(Path(path), max(bucket)), bucket)


def bucket_table(buckets: Sequence[Bucket], assigned: Sequence[int]) -> str:
    """A one-line summary ``"512x512: 12, 576x448: 3, ..."`` of the images per bucket (empty buckets left out)."""
    counts = Counter(assigned)
    return ", ".join(f"{w}x{h}: {counts[i]}" for i, (w, h) in enumerate(buckets) if counts[i])


class BucketBatchSampler(BatchSampler):
    """Batches of dataset indices that all share a bucket (so the images of a batch have one shape).

    Each epoch the indices are shuffled (when ``sampler`` is a ``RandomSampler`` or a shuffling
    ``DistributedSampler``), grouped by bucket into batches of ``batch_size`` (the last batch of a bucket may be
    smaller unless ``drop_last``), and the batches are shuffled. Under DDP, Lightning replaces ``sampler`` by a
    ``DistributedSampler``: the batches are then built from *all* indices with the seed and epoch of that sampler
    (the same on every rank) and dealt to the ranks in turn, truncated to a multiple of the world size, so every
    rank gets the same number of batches and no index twice.

    Args:
        sampler: ``RandomSampler`` (shuffle), ``SequentialSampler`` (no shuffle) or ``DistributedSampler``; only its
            kind and, for a distributed one, its seed/epoch/rank are used.
        batch_size: images per batch.
        drop_last: drop each bucket's last incomplete batch.
        bucket_ids: bucket index of every dataset position (``len(bucket_ids) == len(dataset)``).
        seed: base seed of the shuffle without DDP (epoch ``e`` uses ``seed + e``).

    Raises:
        ValueError: for ``batch_size < 1`` or ``bucket_ids`` of another length than ``sampler``'s dataset.
    """

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool, bucket_ids: Sequence[int],
                 seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        source = getattr(sampler, "data_source", None) or getattr(sampler, "dataset", None)
        if source is not None and len(source) != len(bucket_ids):
            raise ValueError(f"{len(bucket_ids)} bucket ids for a dataset of {len(source)} items")
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.bucket_ids = list(bucket_ids)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle of ``epoch`` (as ``DistributedSampler.set_epoch``)."""
        self.epoch = epoch

    def _distributed(self) -> DistributedSampler | None:
        return self.sampler if isinstance(self.sampler, DistributedSampler) else None

    def _all_batches(self, epoch: int) -> list[list[int]]:
        dist = self._distributed()
        shuffle = dist.shuffle if dist is not None else isinstance(self.sampler, RandomSampler)
        seed = (dist.seed + dist.epoch) if dist is not None else self.seed + epoch
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.bucket_ids), generator=generator).tolist() if shuffle else \
            list(range(len(self.bucket_ids)))
        groups: dict[int, list[int]] = {}
        for i in order:
            groups.setdefault(self.bucket_ids[i], []).append(i)
        batches = []
        for bucket in sorted(groups):
            members = groups[bucket]
            for first in range(0, len(members), self.batch_size):
                batch = members[first:first + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def _my_batches(self) -> list[list[int]]:
        dist = self._distributed()
        batches = self._all_batches(self.epoch)
        if dist is None:
            return batches
        usable = len(batches) // dist.num_replicas * dist.num_replicas
        return batches[dist.rank:usable:dist.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._my_batches()
        if self._distributed() is None:
            self.epoch += 1  # a fresh shuffle next epoch (Lightning sets the epoch of distributed samplers)
        yield from batches

    def __len__(self) -> int:
        return len(self._my_batches())
