"""Data copying: are generated images closer to the training images than new real images are?

A model trained long on a small folder (a few thousand paintings) can reproduce its training images (Somepalli et
al. 2023, "Diffusion Art or Digital Forgery?"; Carlini et al. 2023). FID cannot see it: a perfect copy of the
training set scores a perfect FID. The test here is Meehan, Chaudhuri & Dasgupta 2020 ("A non-parametric test to
detect data-copying in generative models", AISTATS), without their cells: compare the distance from each generated
image to its nearest training image with the same distance for held-out real images (which the model never saw).
If the model copies, the generated distances are smaller; the Mann-Whitney U test between the two sets gives
``z_u``, strongly negative for copying, near 0 for a model that generalises as far as this test can tell, and
positive for samples further from the training images than real paintings are (e.g. blur, artefacts).

Distances are Euclidean, in a feature space (a domain classifier's features) or in pixel space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import mannwhitneyu
from sklearn.neighbors import NearestNeighbors


def nearest(query: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance from each row of ``query`` ``(N, D)`` to its nearest row of ``reference`` ``(R, D)``
    (scikit-learn's exact ``NearestNeighbors``, in float64).

    Returns:
        ``(distances (N,) float64, indices (N,) int64)`` into ``reference``.

    Raises:
        ValueError: for empty inputs or feature dimensions that differ.
    """
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(f"query {tuple(query.shape)} and reference {tuple(reference.shape)} must be (N, D) and "
                         f"(R, D) with the same D")
    if len(query) == 0 or len(reference) == 0:
        raise ValueError("nearest neighbours need at least one query and one reference row")
    index = NearestNeighbors(n_neighbors=1).fit(reference.double().numpy())
    dist, idx = index.kneighbors(query.double().numpy())
    return torch.from_numpy(dist[:, 0]), torch.from_numpy(idx[:, 0]).long()


@dataclass
class CopyReport:
    """Nearest-training-image distances of generated and held-out real images, and the test between them.

    Attributes:
        sample_distances: ``(N,)`` float64, each generated image to its nearest training image.
        sample_indices: ``(N,)`` int64, that training image (index into the training reference).
        heldout_distances: ``(M,)`` float64, each held-out real image to its nearest training image.
        z_u: Mann-Whitney U statistic of generated against held-out distances as a z-score (normal
            approximation; Meehan et al. 2020's ``Z_U`` without cells): < 0 generated images lie closer to the
            training set than new real images do (copying); about 0 no difference; > 0 further away.
        p_value: two-sided p-value of the same test.
        close_quantile: the held-out quantile that defines "too close" (e.g. 0.05).
        close_threshold: that quantile of ``heldout_distances``.
        close_fraction: share of generated images nearer to a training image than ``close_threshold``; about
            ``close_quantile`` for a model that does not copy, up to 1 for one that does.
    """

    sample_distances: torch.Tensor
    sample_indices: torch.Tensor
    heldout_distances: torch.Tensor
    z_u: float
    p_value: float
    close_quantile: float
    close_threshold: float
    close_fraction: float

    def summary(self) -> dict[str, float | int]:
        """The figures of the report as plain numbers (JSON)."""
        return {
            "num_samples": len(self.sample_distances), "num_heldout": len(self.heldout_distances),
            "sample_nn_median": float(self.sample_distances.median()),
            "heldout_nn_median": float(self.heldout_distances.median()),
            "median_ratio": float(self.sample_distances.median() / self.heldout_distances.median()),
            "z_u": self.z_u, "p_value": self.p_value, "close_quantile": self.close_quantile,
            "close_threshold": self.close_threshold, "close_fraction": self.close_fraction,
        }


def copy_report(samples: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor,
                close_quantile: float = 0.05) -> CopyReport:
    """Compare generated and held-out real images by their distance to the nearest training image.

    Args:
        samples: ``(N, D)`` features (or flattened pixels) of generated images.
        train: ``(R, D)`` the same for the training images the model saw (include their mirror images when the
            model trained with flips: a copy may be mirrored).
        heldout: ``(M, D)`` the same for real images the model never saw (validation or test split).
        close_quantile: quantile of the held-out distances below which a generated image counts as close.

    Raises:
        ValueError: for ``close_quantile`` outside ``(0, 1)``, fewer than 2 samples or held-out images, or
            shapes that do not match.
    """
    if not 0 < close_quantile < 1:
        raise ValueError(f"close_quantile={close_quantile} must lie in (0, 1)")
    if len(samples) < 2 or len(heldout) < 2:
        raise ValueError(f"the test needs at least 2 generated and 2 held-out images, got {len(samples)} and "
                         f"{len(heldout)}")
    s_dist, s_idx = nearest(samples, train)
    h_dist, _ = nearest(heldout, train)
    n, m = len(s_dist), len(h_dist)
    test = mannwhitneyu(s_dist.numpy(), h_dist.numpy(), alternative="two-sided")
    z = (float(test.statistic) - n * m / 2) / math.sqrt(n * m * (n + m + 1) / 12)
    threshold = float(torch.quantile(h_dist, close_quantile))
    return CopyReport(s_dist, s_idx, h_dist, z, float(test.pvalue), close_quantile, threshold,
                      float((s_dist < threshold).double().mean()))
