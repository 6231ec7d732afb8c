"""The evaluation protocol: every setting that changes an FID/KID/IS number, recorded beside the number.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"),
KID (Bińkowski et al. 2018, "Demystifying MMD GANs") and IS (Salimans et al. 2016, "Improved Techniques for
Training GANs") and precision/recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models") all depend on the feature network and its weights, on how images are quantised and resized
before it, on the number of samples and on the reference set. :class:`EvalProtocol` holds all of these; its
:meth:`EvalProtocol.reference_key` covers the fields that determine the reference statistics (the cache key).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: How generated and real images become the uint8 the extractors take (same code for both; see ``to_uint8``).
QUANTISATION = "uint8 = floor(((clamp(x, -1, 1) + 1) / 2) * 255 + 0.5)  (as torchvision.utils.save_image)"
#: Bump when the way reference statistics are computed changes; old cache files then miss.
STATS_VERSION = 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantise images in ``[-1, 1]`` to uint8 exactly as a PNG written by ``torchvision.utils.save_image``.

    Args:
        images: ``(B, C, H, W)`` float tensor, nominally in ``[-1, 1]`` (values outside are clamped).

    Returns:
        ``(B, C, H, W)`` uint8 tensor in ``[0, 255]`` on the same device. Real MNIST pixels (``k / 255`` scaled
        to ``[-1, 1]``) map back to exactly ``k``.
    """
    if images.dtype == torch.uint8:
        return images
    x = images.detach().float().clamp(-1, 1).add(1).div(2)
    return x.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def file_digest(path: str | Path | None, length: int = 16) -> str | None:
    """The first ``length`` hex digits of the SHA-256 of a file (``None`` for no path)."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


@dataclass
class EvalProtocol:
    """Everything that an FID/KID/IS number depends on; written into ``metrics.json`` beside the numbers.

    Attributes:
        extractor: feature network name (``inception`` or ``mnist_classifier``).
        weights: weights file name of that network (Inception: ``weights-inception-2015-12-05-6726825d.pth``,
            i.e. torch-fidelity's ``pt_inception-2015-12-05``; classifier: the checkpoint path).
        weights_sha256: first 16 hex digits of the weights file's SHA-256 (``None`` for random test weights).
        feature_layer: which activations are the features (``pool3 (2048)``, ``penultimate (128)``).
        num_features: feature dimension D.
        input_size: side in px the extractor resizes images to (299 for Inception).
        resize: interpolation used for that resize (``bilinear``; Inception with ``antialias=False`` uses
            torch-fidelity's TensorFlow-1-compatible bilinear resize, as the published FID code does).
        antialias: antialiased resize (torchmetrics ≥ 1.8 defaults to ``True``; ``False`` matches published numbers).
        channels: how grey and RGB images are fed (``grey repeated to 3`` for Inception).
        quantisation: how images become uint8 before the extractor (same for real and generated).
        dtype: dtype of the feature statistics (``float64``).
        dataset: reference dataset identity (datamodule class and the settings that change its images).
        reference_split: ``train``, ``val`` or ``test``.
        reference_size: number of reference images used (the first ones of the split, in order).
        num_samples: number of generated images.
        kid_subset_size: KID subset size actually used; kid_subsets: number of KID subsets.
        is_splits: Inception-Score splits.
        prc_k: k of the precision/recall k-NN radii (``None`` when neither was computed).
        prc_num_real, prc_num_fake: real and generated features precision/recall were computed on (the first
            ones of each side; equal counts, ``min(num_samples, reference_size)``, as Kynkäänniemi et al. 2019).
        seed: seed of the generator noise and of KID/IS subset draws.
        sample_image_size: side in px generated images were resized to before the extractor (bilinear,
            antialiased), to compare at the reference's resolution; ``None``: as drawn.
        sampling: sampler options passed to ``model.sample`` (e.g. ``{"sampler": "ddim", ...}``).
    """

    extractor: str
    weights: str | None
    weights_sha256: str | None
    feature_layer: str
    num_features: int
    input_size: int
    resize: str = "bilinear"
    antialias: bool = False
    channels: str = "grey repeated to 3"
    quantisation: str = QUANTISATION
    dtype: str = "float64"
    dataset: dict[str, Any] = field(default_factory=dict)
    reference_split: str = "test"
    reference_size: int = 0
    num_samples: int = 0
    kid_subset_size: int | None = None
    kid_subsets: int = 100
    is_splits: int = 10
    prc_k: int | None = None
    prc_num_real: int | None = None
    prc_num_fake: int | None = None
    seed: int = 0
    sample_image_size: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)

    #: the fields that determine the reference statistics (cache key); the rest describe the generated side
    REFERENCE_FIELDS = ("extractor", "weights_sha256", "feature_layer", "num_features", "input_size", "resize",
                        "antialias", "channels", "quantisation", "dtype", "dataset", "reference_split",
                        "reference_size")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def reference_fields(self) -> dict[str, Any]:
        """The fields that determine the reference statistics, plus the statistics code version."""
        fields = {k: getattr(self, k) for k in self.REFERENCE_FIELDS}
        fields["stats_version"] = STATS_VERSION
        return fields

    def reference_key(self) -> str:
        """16 hex digits identifying the reference statistics (hash of :meth:`reference_fields`)."""
        text = json.dumps(self.reference_fields(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """A few human-readable lines for scripts and logs."""
        p = self
        return "\n".join([
            f"extractor: {p.extractor} ({p.feature_layer}, D={p.num_features}), weights {p.weights} "
            f"[sha256 {p.weights_sha256}]",
            f"preprocessing: {p.quantisation}; {p.channels}; {p.resize} resize to {p.input_size} px, "
            f"antialias={p.antialias}; statistics in {p.dtype}",
            f"reference: {p.dataset.get('name', p.dataset)} split={p.reference_split}, {p.reference_size} images",
            f"generated: {p.num_samples} samples, seed {p.seed}, sampling {p.sampling or 'model defaults'}"
            + (f", resized to {p.sample_image_size} px first" if p.sample_image_size else ""),
            f"KID: subsets={p.kid_subsets}, subset_size={p.kid_subset_size}; IS: splits={p.is_splits}",
        ] + ([f"precision/recall: k={p.prc_k}, {p.prc_num_real} real and {p.prc_num_fake} generated features"]
             if p.prc_k is not None else []))
