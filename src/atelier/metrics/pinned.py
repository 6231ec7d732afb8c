"""The pinned evaluation yardsticks: the domain classifiers' weights that ship with the package.

FID, KID, precision and recall on a domain classifier's features are comparable only under the same weights
(the protocol records the SHA-256 of the file). A retrained classifier is a new file, with other weights on
another kind of CPU, so the weights behind every documented figure are in the package
(``atelier/metrics/weights/<name>.ckpt``, written by ``scripts/pin_feature_weights.py``).
``feature_extractor=mnist_classifier``, ``art_classifier`` and ``art_simclr`` (the self-supervised art network)
read them unless ``feature_extractor.ckpt_path`` (or ``$ATELIER_<NAME>``: ``$ATELIER_MNIST_CLASSIFIER``,
``$ATELIER_ART_CLASSIFIER``, ``$ATELIER_ART_SIMCLR``) names another checkpoint, e.g. one just trained with
``python train.py experiment=<name>``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: extractors with packaged weights; each is trained by ``python train.py experiment=<name>``
PINNED = ("mnist_classifier", "art_classifier", "art_simclr")


def pinned_path(name: str) -> Path:
    """The packaged weights file of extractor ``name`` (it may not exist in a checkout that lacks it).

    Raises:
        ValueError: for a name without pinned weights (listing the ones with).
    """
    if name not in PINNED:
        raise ValueError(f"feature_extractor={name!r} has no pinned weights; pinned: {sorted(PINNED)}")
    return Path(str(resources.files("atelier.metrics") / "weights" / f"{name}.ckpt"))


def classifier_ckpt(ckpt_path: str | Path | None, name: str) -> Path:
    """``ckpt_path`` when given, else the pinned weights of ``name``."""
    return Path(ckpt_path).expanduser() if ckpt_path else pinned_path(name)
