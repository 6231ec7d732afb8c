"""Histogram-matching control for FID: how much of a score is the histogram of content classes alone?

Kynkäänniemi et al. 2023 ("The Role of ImageNet Classes in Fréchet Inception Distance", ICLR 2023, Sec. 4) show
that FID can be lowered without better images: resample a pool of generated images so that the histogram of their
top-1 classes matches the real images' histogram, and FID drops. This module runs that control with any extractor
of :mod:`atelier.metrics`. Classes here are k-means clusters of the extractor's own reference features (Euclidean,
the geometry FID sees), so the control needs no classifier head and works for Inception, the digit classifier and
the art classifier alike. Comparing the FID of a random subset of a model's samples with the FID of a
histogram-matched subset of the same pool says how many points a model could gain from getting the *mix* of
content right; a model whose gain over another exceeds that is better by more than its histogram.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class ReferenceClusters:
    """k-means clusters of reference features.

    Attributes:
        centres: ``(K, D)`` float32 cluster centres in feature space.
        frequencies: ``(K,)`` float64 share of reference images per cluster (sums to 1).
    """

    centres: torch.Tensor
    frequencies: torch.Tensor

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """``(N,)`` int64 id of the nearest centre (Euclidean) of each row of ``features`` ``(N, D)``."""
        return torch.cdist(features.float(), self.centres).argmin(1)


def fit_reference_clusters(features: torch.Tensor, num_clusters: int = 30, seed: int = 0,
                           n_init: int = 3) -> ReferenceClusters:
    """Cluster reference features ``(N, D)`` with k-means (scikit-learn ``KMeans``, k-means++, the best of
    ``n_init`` runs, seeded by ``seed``).

    Raises:
        ValueError: for ``num_clusters`` outside ``[2, N]``.
    """
    from sklearn.cluster import KMeans  # only this control needs scikit-learn here

    n = int(features.shape[0])
    if not 2 <= num_clusters <= n:
        raise ValueError(f"num_clusters={num_clusters} must lie in [2, {n}] (the number of reference images)")
    data = features.detach().double().cpu().numpy()
    km = KMeans(num_clusters, n_init=n_init, random_state=seed).fit(data)
    counts = np.bincount(km.labels_, minlength=num_clusters).astype(np.float64)
    return ReferenceClusters(torch.from_numpy(km.cluster_centers_).float(), torch.from_numpy(counts / counts.sum()))


@dataclass
class MatchedSubset:
    """A subset of a pool whose cluster histogram follows a target.

    Attributes:
        indices: ``(n,)`` int64 indices into the pool, each at most once.
        shortfall: how many of the ``n`` the pool could not supply from the clusters that wanted them (filled with
            random other images instead); 0 means the histogram is matched up to rounding.
    """

    indices: torch.Tensor
    shortfall: int


def matched_subset(assign: torch.Tensor, frequencies: torch.Tensor, n: int,
                   generator: torch.Generator | None = None) -> MatchedSubset:
    """Pick ``n`` pool images so that their cluster histogram follows ``frequencies``.

    Each cluster ``c`` gets ``round(n · frequencies[c])`` images (the rounding remainder goes to the largest
    cluster), drawn without replacement from the pool images assigned to ``c``; where the pool holds fewer, the
    shortfall is filled by a uniform draw from the images not yet chosen.

    Args:
        assign: ``(M,)`` int64 cluster id of each pool image, in ``[0, K)``.
        frequencies: ``(K,)`` target shares, non-negative, summing to 1.
        n: subset size, ``1 ≤ n ≤ M``.
        generator: seeds the draws (same generator state, same subset).

    Raises:
        ValueError: for ``n`` outside ``[1, M]``, ids outside ``[0, K)`` or frequencies that are negative or do
            not sum to 1.
    """
    m, k = int(assign.numel()), int(frequencies.numel())
    if not 1 <= n <= m:
        raise ValueError(f"n={n} must lie in [1, {m}] (the pool size)")
    if m and (int(assign.min()) < 0 or int(assign.max()) >= k):
        raise ValueError(f"cluster ids must lie in [0, {k}), got [{int(assign.min())}, {int(assign.max())}]")
    freq = frequencies.double()
    if bool((freq < 0).any()) or abs(float(freq.sum()) - 1.0) > 1e-6:
        raise ValueError(f"frequencies must be non-negative and sum to 1, got sum {float(freq.sum()):.6f}")
    want = (freq * n).round().long()
    want[int(want.argmax())] += n - int(want.sum())
    chosen: list[torch.Tensor] = []
    for c in range(k):
        members = torch.nonzero(assign == c).flatten()
        take = min(int(want[c]), members.numel())
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:take]])
    picked = torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long)
    shortfall = n - picked.numel()
    if shortfall:
        free = torch.ones(m, dtype=torch.bool)
        free[picked] = False
        rest = torch.nonzero(free).flatten()
        picked = torch.cat([picked, rest[torch.randperm(rest.numel(), generator=generator)[:shortfall]]])
    return MatchedSubset(picked, shortfall)


class StoredImages:
    """A stand-in generative model that hands out stored images in order, so that a fixed set of images can be
    scored by :meth:`atelier.metrics.evaluator.Evaluator.evaluate`.

    Args:
        images: ``(N, C, H, W)`` float in ``[-1, 1]`` or uint8.
    """

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.position = 0

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The next ``n`` stored images ``(n, C, H, W)``; ``generator`` is ignored (the images are fixed).

        Raises:
            ValueError: when fewer than ``n`` images are left.
        """
        if self.position + n > self.images.shape[0]:
            raise ValueError(f"asked for {n} images at position {self.position} of {self.images.shape[0]}")
        out = self.images[self.position:self.position + n]
        self.position += n
        return out


def histogram_control(evaluator: Any, pool: torch.Tensor, num_clusters: int = 30,
                      seed: int = 0) -> dict[str, Any]:
    """Score a random and a histogram-matched subset of ``pool`` with ``evaluator`` (Kynkäänniemi et al. 2023).

    The reference features of ``evaluator`` are clustered (:func:`fit_reference_clusters`), every pool image is
    assigned to its nearest centre in the same feature space, and two subsets of ``evaluator.num_samples`` images
    are scored through :meth:`~atelier.metrics.evaluator.Evaluator.evaluate`: one drawn uniformly (the control)
    and one whose cluster histogram follows the reference's (:func:`matched_subset`).

    Args:
        evaluator: an :class:`~atelier.metrics.evaluator.Evaluator`.
        pool: ``(M, C, H, W)`` generated images, float in ``[-1, 1]`` or uint8, ``M ≥ evaluator.num_samples``
            (a pool several times larger lets the rare clusters be filled).
        num_clusters: ``K`` of the k-means classes.
        seed: seeds k-means and both subset draws.

    Returns:
        ``{"random": metrics, "matched": metrics, "shortfall": int, "num_clusters": K, "pool_size": M,
        "reference_histogram": [K floats], "pool_histogram": [K floats]}``; the metrics dicts are those of
        ``Evaluator.evaluate``.

    Raises:
        ValueError: for a pool smaller than ``evaluator.num_samples`` or a ``num_clusters`` outside ``[2, N]``.
    """
    n, m = evaluator.num_samples, int(pool.shape[0])
    if m < n:
        raise ValueError(f"the pool has {m} images; the evaluator scores {n}: draw a pool of at least {n}")
    clusters = fit_reference_clusters(evaluator.reference().features, num_clusters, seed)
    assign = clusters.assign(evaluator.features(pool))
    generator = torch.Generator().manual_seed(seed)
    control = torch.randperm(m, generator=generator)[:n]
    matched = matched_subset(assign, clusters.frequencies, n, generator)
    pool_hist = torch.bincount(assign, minlength=num_clusters).double() / m
    return {
        "random": evaluator.evaluate(StoredImages(pool[control]))["metrics"],
        "matched": evaluator.evaluate(StoredImages(pool[matched.indices]))["metrics"],
        "shortfall": matched.shortfall, "num_clusters": num_clusters, "pool_size": m,
        "reference_histogram": [round(float(v), 4) for v in clusters.frequencies],
        "pool_histogram": [round(float(v), 4) for v in pool_hist],
    }
