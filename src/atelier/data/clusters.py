"""Pseudo-labels from unlabelled images: k-means clusters for self-labelled conditioning of generative models."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def check_label_source(labels: str, allowed: tuple[str, ...], num_clusters: int) -> None:
    """Check a datamodule's ``data.labels`` choice (one of ``allowed``; ``kmeans`` is the self-labelled one) and,
    for ``kmeans``, its ``data.num_clusters``.

    Raises:
        ValueError: naming the key and the allowed values (``labels``) or range (``num_clusters``: 2..1000).
    """
    if labels not in allowed:
        raise ValueError(f"data.labels={labels!r} is not allowed; choose one of {list(allowed)}")
    if labels == "kmeans" and not 2 <= num_clusters <= 1000:
        raise ValueError(f"data.num_clusters must be in 2..1000 for data.labels=kmeans, got {num_clusters}")


def kmeans_labels(images: torch.Tensor, num_clusters: int, seed: int = 0, pca_dim: int = 50,
                  n_init: int = 3) -> torch.Tensor:
    """Cluster images without their labels: ``(N,)`` int64 cluster ids in ``[0, num_clusters)``.

    Pixels are flattened, scaled to ``[0, 1]`` (uint8 input) or taken as they are (float input), projected on
    their first ``pca_dim`` principal components (scikit-learn ``PCA``) and clustered by k-means (scikit-learn
    ``KMeans``, k-means++ initialisation, the best of ``n_init`` runs), both seeded by ``seed`` so the same images
    give the same ids. A conditional generative model trained on these ids and sampled with ids drawn from the
    clusters' frequencies draws from the unconditional data distribution while modelling one cluster at a time:
    self-labelled conditioning (Hu et al. 2023, "Self-Guided Diffusion Models", which cluster self-supervised
    features; here pixel space, which needs no pretrained network).

    Args:
        images: ``(N, ...)`` uint8 in ``[0, 255]`` or float, one image per row (e.g. MNIST ``(N, 28, 28)``).
        num_clusters: number of clusters ``k``.
        seed: random state of the PCA solver and of k-means.
        pca_dim: principal components kept (capped at the pixel count and at ``N``).
        n_init: k-means restarts; the run with the lowest inertia wins.

    Raises:
        ValueError: for ``num_clusters`` outside ``[2, N]`` or fewer than 2 images.
    """
    from sklearn.cluster import KMeans  # only clustering needs scikit-learn, not every MNIST run
    from sklearn.decomposition import PCA

    n = int(images.shape[0])
    if n < 2 or not 2 <= num_clusters <= n:
        raise ValueError(f"num_clusters={num_clusters} must lie in [2, {n}] (the number of images)")
    x = images.reshape(n, -1)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    data = x.cpu().numpy().astype(np.float32)
    dims = min(pca_dim, data.shape[1], n)
    z = PCA(dims, random_state=seed).fit_transform(data) if dims < data.shape[1] else data
    ids = KMeans(num_clusters, n_init=n_init, random_state=seed).fit_predict(z)
    return torch.from_numpy(ids.astype(np.int64))


def cluster_purity(clusters: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose cluster's most common label is their own label, in ``[0, 1]`` (1: every
    cluster holds one class). ``clusters`` and ``labels`` are ``(N,)`` int64; a diagnostic only, the labels are
    not used to form the clusters."""
    clusters, labels = clusters.long(), labels.long()
    if clusters.shape != labels.shape or clusters.numel() == 0:
        raise ValueError(f"clusters {tuple(clusters.shape)} and labels {tuple(labels.shape)} must be equal, non-empty")
    majority = sum(int(torch.bincount(labels[clusters == c]).max()) for c in clusters.unique())
    return majority / clusters.numel()


def feature_vectors(extractor: Callable[[torch.Tensor], dict[str, torch.Tensor]], images: torch.Tensor,
                    batch_size: int = 256) -> torch.Tensor:
    """``(N, D)`` float32 unit-length feature vectors of ``images`` for clustering by content instead of pixels.

    Args:
        extractor: a feature extractor of :mod:`atelier.metrics` (e.g.
            :class:`~atelier.metrics.art_features.ArtClassifierFeatures`): uint8 ``(B, C, H, W)`` →
            ``{"features": (B, D)}``.
        images: ``(N, H, W, C)`` uint8 in ``[0, 255]`` (as :func:`atelier.data.art_folder.fitted_pixels` gives).
        batch_size: images per extractor call.

    Each vector is divided by its L2 norm, so k-means on them groups by direction (cosine similarity), as
    self-labelled diffusion clusters self-supervised features (Hu et al. 2023, "Self-Guided Diffusion Models").

    Raises:
        ValueError: for images that are not ``(N, H, W, 1|3)``.
    """
    if images.dim() != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"feature_vectors expects (N, H, W, 1|3) images, got {tuple(images.shape)}")
    chunks = [extractor(images[i:i + batch_size].permute(0, 3, 1, 2).contiguous())["features"].float().cpu()
              for i in range(0, images.shape[0], batch_size)]
    return torch.nn.functional.normalize(torch.cat(chunks), dim=1)
