"""One evaluation under one protocol: cached reference statistics, batched sampling, batched feature extraction.

Used by ``evaluate.py`` (:mod:`atelier.tasks.evaluate`), the in-training callback (:mod:`atelier.callbacks.fid`)
and the scripts (``scripts/fid_vs_nfe.py``, ``scripts/compare.py``).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from atelier.metrics.cache import ReferenceCache, ReferenceStats, dataset_identity, resolve_split
from atelier.metrics.precision_recall import DEFAULT_K
from atelier.metrics.protocol import EvalProtocol, to_uint8
from atelier.metrics.suite import (
    DEFAULT_METRICS,
    GenerativeMetrics,
    build_extractor,
    check_domain,
    check_metrics,
    labels_share_the_features,
)
from atelier.sampling.interface import accepted_kwargs

log = logging.getLogger(__name__)


class Evaluator:
    """FID/KID/IS and precision/recall of a generative module's samples against a datamodule's reference split.

    Args:
        feature_extractor: an extractor module or its config (``{"name": "mnist_classifier", "ckpt_path": ...}``).
        datamodule: the reference LightningDataModule (``setup`` is called when needed).
        metrics: subset of ``("fid", "kid", "is", "precision", "recall")`` (default: fid, kid, is).
        num_samples: generated images per evaluation.
        reference_split: ``train``, ``val``, ``test`` or ``None`` (test when present, else train).
        reference_size: reference images (the first ones of the split); ``None``: the whole split.
        cache_dir: folder of the reference-statistics cache (``None``: no disk cache).
        kid_subset_size: see :class:`GenerativeMetrics` (``None`` adapts); kid_subsets, is_splits: as there.
        batch_size: images per sampling call and per extractor call.
        seed: seed of the sampling noise and of KID/IS subset draws.
        device: where the extractor runs (the model stays where it is).
        prc_k: k of the precision/recall k-NN radii (Kynkäänniemi et al. 2019: 3); they use the first
            ``min(num_samples, reference_size)`` features of each side.
        sample_image_size: side in px the generated images are resized to (bilinear, antialiased) before the
            extractor; ``None``: as drawn. With the reference loaded at the same size (``evaluate.py
            reference_image_size``) models drawn at different sizes are compared at one common resolution, e.g.
            a 64 px GAN and a 32 px DDPM both at 32 px.

    Raises:
        ValueError: for unknown metrics, fewer than 2 samples, a non-positive batch size or
            ``sample_image_size``, a ``reference_size`` outside the split, (with precision/recall) ``prc_k``
            not below ``min(num_samples, reference_size)``, ``is`` with an extractor without class logits
            (``art_simclr``), or a domain classifier given data of another domain (the MNIST classifier and RGB
            images: :func:`~atelier.metrics.suite.check_domain`).
    """

    def __init__(self, feature_extractor: Mapping[str, Any] | nn.Module, datamodule: Any,
                 metrics: Sequence[str] = DEFAULT_METRICS, num_samples: int = 1000, reference_split: str | None = None,
                 reference_size: int | None = None, cache_dir: str | Path | None = None,
                 kid_subset_size: int | None = None, kid_subsets: int = 100, is_splits: int = 10,
                 batch_size: int = 250, seed: int = 0, device: str | torch.device = "cpu", prc_k: int = DEFAULT_K,
                 sample_image_size: int | None = None) -> None:
        self.metric_names = check_metrics(metrics)
        if int(num_samples) < 2:
            raise ValueError(f"num_samples={num_samples} is too small; FID/KID need at least 2 generated images")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if sample_image_size is not None and int(sample_image_size) < 1:
            raise ValueError(f"sample_image_size={sample_image_size} must be a positive size in px or null")
        self.sample_image_size = None if sample_image_size is None else int(sample_image_size)
        self.extractor = build_extractor(feature_extractor).to(device)
        self.datamodule = datamodule
        self.split, self.dataset = resolve_split(datamodule, reference_split)
        check_domain(self.extractor, self.dataset, type(datamodule).__name__)
        self.labels_share_features = labels_share_the_features(self.extractor, datamodule)
        n = len(self.dataset)
        if reference_size is None:
            reference_size = n
        if not 2 <= int(reference_size) <= n:
            raise ValueError(f"reference_size={reference_size} is not allowed: the {self.split} split has {n} "
                             f"images; choose 2..{n} or null (all)")
        self.num_samples, self.reference_size = int(num_samples), int(reference_size)
        self.prc_k = int(prc_k) if {"precision", "recall"} & set(self.metric_names) else None
        if self.prc_k is not None and not 1 <= self.prc_k < min(self.num_samples, self.reference_size):
            raise ValueError(f"prc_k={prc_k} is not allowed with num_samples={self.num_samples} and reference_size="
                             f"{self.reference_size}: choose 1 ≤ prc_k < {min(self.num_samples, self.reference_size)}")
        self.cache = ReferenceCache(cache_dir)
        self.kid_subset_size, self.kid_subsets, self.is_splits = kid_subset_size, kid_subsets, is_splits
        self.batch_size, self.seed, self.device = int(batch_size), int(seed), device
        self.metrics = GenerativeMetrics(self.extractor, self.metric_names, kid_subsets, kid_subset_size,
                                         is_splits, prc_k=self.prc_k or DEFAULT_K).to(device)
        self._reference: ReferenceStats | None = None
        self.cache_hit: bool | None = None
        num_features = int(self.extractor.num_features)
        if self.num_samples <= num_features and "fid" in self.metric_names:
            warnings.warn(f"num_samples={self.num_samples} ≤ feature dimension {num_features}: the generated "
                          f"covariance is singular and FID is biased upwards; use more samples", stacklevel=2)

    def protocol(self, sampling: Mapping[str, Any] | None = None) -> EvalProtocol:
        """The protocol record of this evaluation (``sampling``: the options passed to ``sample``)."""
        e = self.extractor
        resize = getattr(e, "resize", None) or ("bilinear (torch-fidelity TF1-compatible)"
                                                if e.name == "inception" and not e.antialias else "bilinear")
        kid_size = None
        if "kid" in self.metric_names:
            kid_size = self.kid_subset_size or min(1000, self.num_samples, self.reference_size)
        prc_n = min(self.num_samples, self.reference_size) if self.prc_k is not None else None
        return EvalProtocol(
            extractor=e.name, weights=e.weights, weights_sha256=e.weights_sha256, feature_layer=e.feature_layer,
            num_features=int(e.num_features), input_size=int(e.input_size), resize=resize, antialias=e.antialias,
            channels=e.channels, dataset=dataset_identity(self.datamodule), reference_split=self.split,
            reference_size=self.reference_size, num_samples=self.num_samples, kid_subset_size=kid_size,
            kid_subsets=self.kid_subsets, is_splits=self.is_splits, prc_k=self.prc_k, prc_num_real=prc_n,
            prc_num_fake=prc_n, seed=self.seed, sample_image_size=self.sample_image_size,
            sampling={k: type(v).__name__ if isinstance(v, torch.nn.Module) else v
                      for k, v in (sampling or {}).items() if k != "labels"},
        )

    def reference(self) -> ReferenceStats:
        """Reference statistics: from memory, else the disk cache, else computed (and cached)."""
        if self._reference is None:
            self._reference, self.cache_hit = self.cache.get(self.protocol(), self.extractor, self.dataset,
                                                             self.batch_size, self.device)
            self.metrics.set_reference(self._reference)
        return self._reference

    @torch.no_grad()
    def evaluate(self, model: Any, sample_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Draw ``num_samples`` images from ``model.sample`` (in batches) and measure them.

        ``sample_kwargs`` may hold ``labels`` ``(num_samples,)`` int64 for a class-conditional model: each batch
        gets its slice, and with a domain classifier the result has ``cond_accuracy``, the fraction of samples
        the classifier assigns to the class asked for.

        Returns:
            ``{"metrics": {...}, "protocol": {...}, "timing": {...}, "reference_cache_hit": bool}``; timing has
            ``sampling_seconds_per_image``, ``feature_images_per_sec`` and ``reference_seconds``.
        """
        kwargs = accepted_kwargs(model, dict(sample_kwargs or {}))
        kwargs.pop("batch_size", None)
        labels = kwargs.pop("labels", None)
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long).flatten()
            if labels.numel() != self.num_samples:
                raise ValueError(f"got {labels.numel()} labels for num_samples={self.num_samples}")
        reference = self.reference()
        self.metrics.reset()
        generator = torch.Generator().manual_seed(self.seed)
        sampling_seconds = 0.0
        start_all = time.perf_counter()
        for images, batch_labels, seconds in sample_batches(model, self.num_samples, self.batch_size, generator,
                                                            labels, kwargs):
            sampling_seconds += seconds
            self.metrics.update(self._resized(images).to(self.device), labels=batch_labels)
        values = self.metrics.compute(seed=self.seed)
        shared = self.metrics.shared
        timing = {
            "sampling_seconds_per_image": round(sampling_seconds / self.num_samples, 5),
            "feature_images_per_sec": round(shared.images / shared.seconds, 1) if shared.seconds else None,
            "total_seconds": round(time.perf_counter() - start_all, 2),
            "reference_seconds": round(reference.seconds, 2),
        }
        return {"metrics": values, "protocol": self.protocol(kwargs).to_dict(), "timing": timing,
                "reference_cache_hit": self.cache_hit}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` float32 extractor features (on the CPU) of generated ``images`` ``(N, C, H, W)`` (float in
        ``[-1, 1]`` or uint8), prepared as :meth:`evaluate` prepares samples: resized to ``sample_image_size``,
        quantised to uint8, in batches of ``batch_size``; the same space as ``reference().features``."""
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = self._resized(images[start:start + self.batch_size]).to(self.device)
            out.append(self.extractor(to_uint8(batch))["features"].float().cpu())
        return torch.cat(out)

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` generated images at ``sample_image_size`` (bilinear, antialiased; same value range)."""
        size = self.sample_image_size
        if size is None or tuple(images.shape[-2:]) == (size, size):
            return images
        return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def sample_batches(model: Any, n: int, batch_size: int, generator: torch.Generator,
                   labels: torch.Tensor | None = None, options: Mapping[str, Any] | None = None,
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, float]]:
    """Draw ``n`` images from ``model.sample`` in batches of at most ``batch_size``, all from one ``generator``.

    Args:
        model: anything with ``sample(n, generator, **options)``; a ``batch_size`` keyword is passed where its
            ``sample`` takes one.
        n: images in all.
        batch_size: images per call.
        generator: the noise of every batch, in order (same seed, same images).
        labels: ``(n,)`` int64 classes of a class-conditional model; each batch gets its slice.
        options: further keywords of ``sample``, already filtered to the ones it accepts.

    Yields:
        ``(images, batch_labels, seconds)``: ``(b, C, H, W)`` as ``sample`` returns them, the labels' slice (or
        ``None``), and the wall time of that call.
    """
    takes_batch_size = _takes_batch_size(model)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        kwargs = dict(options or {})
        batch_labels = None if labels is None else labels[start:start + b]
        if batch_labels is not None:
            kwargs["labels"] = batch_labels
        if takes_batch_size:
            kwargs["batch_size"] = b
        t0 = time.perf_counter()
        images = model.sample(b, generator=generator, **kwargs)
        yield images, batch_labels, time.perf_counter() - t0


def _takes_batch_size(model: Any) -> bool:
    return "batch_size" in accepted_kwargs(model, {"batch_size": 1}, warn=False)
