"""Improved precision and recall for generative models (Kynkäänniemi et al. 2019, "Improved Precision and Recall
Metric for Assessing Generative Models", NeurIPS), on the features of any extractor of the evaluation protocol.

Each feature vector ``φ`` of a set ``Φ`` spans a hypersphere whose radius is the distance to its k-th nearest
neighbour in ``Φ`` (itself excluded); the union of these spheres estimates the set's manifold (paper, Eq. 1):

    f(φ, Φ) = 1  if  ‖φ − φ'‖₂ ≤ ‖φ' − NN_k(φ', Φ)‖₂  for at least one φ' ∈ Φ,  else 0

    precision(Φ_r, Φ_g) = mean over φ_g ∈ Φ_g of f(φ_g, Φ_r)    (generated samples inside the real manifold)
    recall(Φ_r, Φ_g)    = mean over φ_r ∈ Φ_r of f(φ_r, Φ_g)    (real samples inside the generated manifold)

(paper, Eq. 2). ``k = 3`` is the paper's default. A mode-collapsed generator keeps precision high and loses
recall (the real modes it misses are outside its manifold); blurry or displaced samples fall off the real manifold
and lose precision. Both numbers are in ``[0, 1]`` and depend on the number of samples (the spheres shrink as the
sets grow), so compare them only at equal counts: :class:`PrecisionRecall` uses as many real as generated
features by default, as the paper does (50k each).

The computation is torch-fidelity's (``torch_fidelity.metric_prc.calculate_precision_recall_part``, ≥ 0.4):
``torch.cdist`` row blocks, k-th-neighbour radii by ``kthvalue(k + 1)`` (the zero self-distance is the first), in
the features' dtype (float64 here), never holding more than one ``(block, N)`` distance matrix at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from atelier.metrics.protocol import to_uint8

#: k of the k-NN radii (Kynkäänniemi et al. 2019 use 3)
DEFAULT_K = 3
#: distance-matrix block size in elements (float64: 8 bytes each, so 128 MiB per block)
DEFAULT_MAX_BLOCK_ELEMENTS = 1 << 24


def _torch_fidelity_prc() -> Any:
    try:
        from torch_fidelity.metric_prc import calculate_precision_recall_part
    except ImportError as err:
        raise ModuleNotFoundError(
            "metrics precision/recall need torch-fidelity >= 0.4 (torch_fidelity.metric_prc): "
            "pip install 'torch-fidelity>=0.4'"
        ) from err
    return calculate_precision_recall_part


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = DEFAULT_K,
                     max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 1–2) of ``fake`` against ``real`` features.

    Args:
        real: ``(N_r, D)`` real (reference) features, any float dtype (computed in float64).
        fake: ``(N_g, D)`` generated features.
        k: the k of the k-th-nearest-neighbour radii (``1 ≤ k < min(N_r, N_g)``).
        max_block_elements: at most this many pairwise distances are held at once (rows per block:
            ``max(1, max_block_elements // max(N_r, N_g))``); bounds memory at ``8 · max_block_elements`` bytes
            per distance block.

    Returns:
        ``(precision, recall)``, each in ``[0, 1]``: the fraction of generated features inside the union of the
        real features' k-NN spheres, and the fraction of real features inside the generated ones'.

    Raises:
        ValueError: for non-2-D inputs, different feature dimensions, non-finite features, or a ``k`` that is
            not in ``[1, min(N_r, N_g) - 1]``.
        ModuleNotFoundError: when torch-fidelity ≥ 0.4 is not installed.
    """
    if real.dim() != 2 or fake.dim() != 2:
        raise ValueError(f"precision/recall take (N, D) features, got real {tuple(real.shape)} and fake "
                         f"{tuple(fake.shape)}")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and generated features have different dimensions: {real.shape[1]} vs "
                         f"{fake.shape[1]}")
    k = int(k)
    n = min(real.shape[0], fake.shape[0])
    if not 1 <= k < n:
        raise ValueError(f"prc_k={k} is not allowed with {real.shape[0]} real and {fake.shape[0]} generated "
                         f"features: choose 1 ≤ k < {n} (k-th neighbour excluding the point itself), or use more "
                         f"samples (num_samples, reference_size)")
    real, fake = real.double(), fake.double()
    if not (torch.isfinite(real).all() and torch.isfinite(fake).all()):
        raise ValueError("precision/recall got non-finite features (NaN or inf); check the generated images")
    block = max(1, int(max_block_elements) // max(real.shape[0], fake.shape[0]))
    # torch-fidelity's convention: features_1 = generated, features_2 = real
    precision, recall = _torch_fidelity_prc()(fake, real, neighborhood=k, batch_size=block)
    # torch-fidelity averages in float32; give the exact fractions count / N (exact while N < 2^23)
    return round(precision * fake.shape[0]) / fake.shape[0], round(recall * real.shape[0]) / real.shape[0]


class PrecisionRecall(Metric):
    """Improved precision and recall (Kynkäänniemi et al. 2019) as a torchmetrics metric, like torchmetrics' KID.

    ``update(images, real)`` runs ``feature`` on uint8 images (float images in ``[-1, 1]`` are quantised with
    :func:`atelier.metrics.protocol.to_uint8` first) and keeps the ``(B, D)`` features; the real side can also be
    set directly (``real_features = [tensor]``, the cached reference features). :meth:`compute` returns
    ``{"precision", "recall", "prc_k", "prc_num_real", "prc_num_fake"}``.

    Args:
        feature: module mapping uint8 ``(B, C, H, W)`` images to ``(B, D)`` features (a :class:`FeatureHead`).
        k: k of the k-NN radii (paper default 3).
        equal_counts: use the first ``min(N_r, N_g)`` features of each side (as the paper, which uses equal
            counts; the numbers depend on the counts). ``False``: all of both.
        reset_real_features: whether :meth:`reset` also forgets the real side (``False`` keeps the reference,
            as torchmetrics' FID/KID option of that name).
        max_block_elements: memory bound of the distance blocks (see :func:`precision_recall`).
        kwargs: torchmetrics ``Metric`` options (``sync_on_compute`` ...).

    Raises:
        ValueError: for ``k < 1`` (at construction) and from :func:`precision_recall` at compute.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, feature: nn.Module, k: int = DEFAULT_K, equal_counts: bool = True,
                 reset_real_features: bool = True, max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(k) < 1:
            raise ValueError(f"prc_k={k} is not allowed; choose k ≥ 1 (the paper uses 3)")
        self.feature = feature
        self.k = int(k)
        self.equal_counts = bool(equal_counts)
        self.reset_real_features = bool(reset_real_features)
        self.max_block_elements = int(max_block_elements)
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add ``(B, C, H, W)`` images (uint8, or float in ``[-1, 1]``) to the real or the generated side."""
        features = self.feature(to_uint8(images)).double()
        (self.real_features if real else self.fake_features).append(features)

    def reset(self) -> None:
        """Forget the generated side, and the real side too when ``reset_real_features``."""
        if self.reset_real_features:
            super().reset()
            return
        default = self._defaults.pop("real_features")  # torchmetrics clears list states in place
        try:
            super().reset()
        finally:
            self._defaults["real_features"] = default

    def counts(self, num_real: int, num_fake: int) -> tuple[int, int]:
        """How many real and generated features :meth:`compute` uses for the given totals."""
        if self.equal_counts:
            n = min(num_real, num_fake)
            return n, n
        return num_real, num_fake

    def compute(self) -> dict[str, Any]:
        """``{"precision", "recall"}`` in ``[0, 1]`` and the ``k`` and feature counts they were computed with."""
        if not self.real_features or not self.fake_features:
            raise ValueError("precision/recall need real and generated features: update both sides first")
        real = torch.cat(list(self.real_features))
        fake = torch.cat(list(self.fake_features))
        n_real, n_fake = self.counts(real.shape[0], fake.shape[0])
        precision, recall = precision_recall(real[:n_real], fake[:n_fake], self.k, self.max_block_elements)
        return {"precision": precision, "recall": recall, "prc_k": self.k, "prc_num_real": n_real,
                "prc_num_fake": n_fake}
