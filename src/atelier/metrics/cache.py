"""Reference statistics (features, mean, covariance, count) of a dataset split, cached on disk.

A cache file is named ``<dataset>_<split>-<size>_<extractor>_<key>.pt``, where ``key`` hashes every protocol field
that changes the reference statistics (dataset settings, split, size, extractor and its weights' SHA-256, resize,
antialias, quantisation, dtype; :meth:`EvalProtocol.reference_fields`). Changing any of them gives another key,
so the old file is not used; a file whose stored fields differ from the requested ones is recomputed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from atelier.metrics.protocol import EvalProtocol, to_uint8

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: datamodule settings that do not change the images (left out of the dataset identity)
_NOT_IDENTITY = {"batch_size", "num_workers", "pin_memory", "download", "persistent_workers", "data_dir",
                 "check_images"}


@dataclass
class ReferenceStats:
    """Features of the reference images and their statistics.

    Attributes:
        features: ``(N, D)`` float32 features exactly as the extractor returned them (KID needs them all).
        mean: ``(D,)`` float64 mean; cov: ``(D, D)`` float64 unbiased covariance; count: ``N``.
        fields: the protocol's reference fields these statistics were computed under.
        seconds: wall time of the feature extraction (0 when read from the cache).
    """

    features: torch.Tensor
    mean: torch.Tensor
    cov: torch.Tensor
    count: int
    fields: dict[str, Any]
    seconds: float = 0.0

    @classmethod
    def from_features(cls, features: torch.Tensor, fields: dict[str, Any], seconds: float = 0.0) -> ReferenceStats:
        f = features.double()
        mean = f.mean(0)
        centred = f - mean
        cov = centred.T @ centred / max(1, f.shape[0] - 1)
        return cls(features.float().cpu(), mean.cpu(), cov.cpu(), int(f.shape[0]), fields, seconds)


def dataset_identity(datamodule: Any) -> dict[str, Any]:
    """The datamodule class and the settings that change its images (image size, channels, split seed, root)."""
    hparams = dict(getattr(datamodule, "hparams", {}) or {})
    identity = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(hparams.items())
                if k not in _NOT_IDENTITY and isinstance(v, str | int | float | bool | Path | type(None))}
    return {"name": type(datamodule).__name__, **identity}


def resolve_split(datamodule: Any, split: str | None) -> tuple[str, Dataset]:
    """The reference split name and dataset; ``None`` picks ``test`` when the datamodule has one, else ``train``.

    Raises:
        ValueError: for an unknown split or one the datamodule does not have (naming ``reference_split``).
    """
    if getattr(datamodule, "train_set", None) is None:
        datamodule.setup("fit")
    available = [s for s in SPLITS if getattr(datamodule, f"{s}_set", None) is not None]
    if split is None:
        split = "test" if "test" in available else "train"
    if split not in available:
        raise ValueError(f"reference_split={split!r} is not allowed for {type(datamodule).__name__}; choose one of "
                         f"{available}")
    return split, getattr(datamodule, f"{split}_set")


def reference_batches(dataset: Dataset, size: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The first ``size`` images of ``dataset`` in order, as uint8 ``(B, C, H, W)`` batches."""
    loader = DataLoader(Subset(dataset, range(size)), batch_size=batch_size, shuffle=False)
    for batch in loader:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        yield to_uint8(images)


@torch.no_grad()
def compute_reference_stats(extractor: nn.Module, dataset: Dataset, size: int, fields: dict[str, Any],
                            batch_size: int = 250, device: str | torch.device = "cpu") -> ReferenceStats:
    """Run ``extractor`` over the first ``size`` images of ``dataset`` and return their statistics."""
    start = time.perf_counter()
    chunks = [extractor(batch.to(device))["features"].cpu() for batch in reference_batches(dataset, size, batch_size)]
    return ReferenceStats.from_features(torch.cat(chunks), fields, time.perf_counter() - start)


class ReferenceCache:
    """Reference statistics on disk under ``cache_dir`` (``None``: no caching), one file per reference key."""

    def __init__(self, cache_dir: str | Path | None) -> None:
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None

    def path(self, protocol: EvalProtocol) -> Path | None:
        if self.cache_dir is None:
            return None
        name = f"{protocol.dataset.get('name', 'data')}_{protocol.reference_split}-{protocol.reference_size}_" \
               f"{protocol.extractor}_{protocol.reference_key()}.pt"
        return self.cache_dir / name

    def load(self, protocol: EvalProtocol) -> ReferenceStats | None:
        """The cached statistics for ``protocol``, or ``None`` (no file, unreadable, or other fields)."""
        path = self.path(protocol)
        if path is None or not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file is recomputed
            log.warning("reference cache %s unreadable (%s): recomputing", path, err)
            return None
        if data.get("fields") != _plain(protocol.reference_fields()):
            log.info("reference cache %s was made under another protocol: recomputing", path)
            return None
        return ReferenceStats(data["features"], data["mean"], data["cov"], int(data["count"]), data["fields"])

    def save(self, protocol: EvalProtocol, stats: ReferenceStats) -> Path | None:
        path = self.path(protocol)
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"features": stats.features, "mean": stats.mean, "cov": stats.cov, "count": stats.count,
                    "fields": _plain(stats.fields)}, tmp)
        tmp.replace(path)
        return path

    def get(self, protocol: EvalProtocol, extractor: nn.Module, dataset: Dataset, batch_size: int = 250,
            device: str | torch.device = "cpu") -> tuple[ReferenceStats, bool]:
        """``(statistics, cache_hit)``: from the cache when it holds them, else computed and saved."""
        cached = self.load(protocol)
        if cached is not None:
            log.info("reference statistics from cache %s", self.path(protocol))
            return cached, True
        stats = compute_reference_stats(extractor, dataset, protocol.reference_size,
                                        _plain(protocol.reference_fields()), batch_size, device)
        path = self.save(protocol, stats)
        log.info("reference statistics of %d images in %.1f s%s", stats.count, stats.seconds,
                 f", cached in {path}" if path else "")
        return stats, False


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    """JSON-like copy (what ``torch.load(weights_only=True)`` gives back), for comparison."""
    import json

    return json.loads(json.dumps(fields, sort_keys=True, default=str))
