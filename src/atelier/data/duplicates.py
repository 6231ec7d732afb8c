"""Duplicate images in a folder: the same picture under two file names (re-encoded, renamed, copied twice).

Collections scraped or merged from several sources hold such copies: at the default tolerance 77 of the shared
art folder's 2,787 files copy another one (stop 39). A duplicate split across the training and validation sets
leaks the validation image into training, and a generative model's nearest-neighbour copy test sees it as a copy.
Images are compared as small thumbnails (``(N, H, W, C)`` uint8): two match when their root-mean-square pixel
difference is at most ``tol`` grey levels. A re-encoded or rescaled copy differs by about 2 levels at 32 px. Other
reproductions of the same painting (another colour balance or crop) differ by up to ~20 levels, as do two
paintings of one series (Monet's Parliament), so a pixel tolerance catches near-exact copies only (docs/data.md).
"""

from __future__ import annotations

import torch
from sklearn.neighbors import NearestNeighbors

#: the default match tolerance: root-mean-square difference in grey levels (of 255) between two 32 px thumbnails
DUPLICATE_RMS_LEVELS = 4.0


def duplicate_sources(thumbs: torch.Tensor, tol: float = DUPLICATE_RMS_LEVELS) -> torch.Tensor:
    """For each image, the index of the first earlier image it duplicates, else -1.

    Args:
        thumbs: ``(N, ...)`` uint8 in ``[0, 255]``, one thumbnail per image, all the same shape.
        tol: the largest root-mean-square difference (grey levels) at which two thumbnails count as one image.

    Returns:
        ``(N,)`` int64: ``-1`` for the first image of each group of duplicates, else the index of that first
        image (so keeping the images with ``-1`` keeps one of each). The neighbours within ``tol`` come from
        scikit-learn's ``NearestNeighbors.radius_neighbors``.

    Raises:
        ValueError: for a negative ``tol``.
    """
    if tol < 0:
        raise ValueError(f"tol={tol} must be ≥ 0 grey levels")
    n = len(thumbs)
    flat = thumbs.reshape(n, -1).double().numpy()
    radius = tol * flat.shape[1] ** 0.5  # RMS tol → Euclidean distance
    _, neighbours = NearestNeighbors(radius=radius).fit(flat).radius_neighbors(flat)
    source = torch.full((n,), -1, dtype=torch.long)
    for i, found in enumerate(neighbours):
        earlier = found[found < i]
        if len(earlier):
            first = int(earlier.min())
            # a chain (c matches b, b matches a): point at the group's first image
            source[i] = first if source[first] < 0 else source[first]
    return source
