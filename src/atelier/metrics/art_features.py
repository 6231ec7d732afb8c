"""The art-domain feature extractor: penultimate features and logits of the small painting classifier.

``python train.py experiment=art_classifier`` trains :class:`atelier.models.classifier.MNISTClassifier` (the same
module and :class:`~atelier.models.classifier.ClassifierNet` as the MNIST extractor, configured for 3 channels,
3 artists and 64 px, with strong augmentation) on the art folder and writes ``outputs/art_classifier/
classifier.ckpt``; ``feature_extractor=art_classifier`` reads it. Like the MNIST classifier it needs no download
and runs fast on a CPU; its numbers are comparable only with numbers from the same checkpoint (its SHA-256 is in
the protocol record and in the reference-cache key) and are on another scale than Inception FID/KID.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from atelier.metrics.mnist_features import classifier_outputs, load_classifier_net
from atelier.metrics.pinned import classifier_ckpt
from atelier.metrics.protocol import file_digest

EXPERIMENT = "art_classifier"
ENV_VAR = "ATELIER_ART_CLASSIFIER"


class ArtClassifierFeatures(nn.Module):
    """Penultimate features and artist logits of a 3-channel :class:`~atelier.models.classifier.ClassifierNet`.

    Input: ``(B, 1 | 3, H, W)`` uint8 in ``[0, 255]`` (grey is repeated to 3 channels for an RGB network; a
    1-channel network gets the channel mean). Images are scaled to ``[-1, 1]``; a non-square image is centre-
    cropped to its short side (as :class:`~atelier.data.art_folder.ArtFolderDataModule` fits paintings), and a side
    other than the network's ``S`` is resized bilinearly to ``S × S`` with ``antialias`` (``True`` by default here:
    downscaling the art folder's 128 px paintings, or larger scans, to 64 px without it aliases). Output:
    ``{"features": (B, feature_dim) float32 (≥ 0, after ReLU), "logits": (B, num_classes) float32}``.

    Args:
        ckpt_path: classifier checkpoint (``python train.py experiment=art_classifier``); default: the pinned
            weights (:mod:`atelier.metrics.pinned`).
        antialias: antialiased resize for sizes other than the network's.
        net: a ``ClassifierNet`` to use instead of loading ``ckpt_path`` (tests, notebooks).

    Raises:
        FileNotFoundError, TypeError: from :func:`atelier.metrics.mnist_features.load_classifier_net` for a
            missing checkpoint or one that holds no classifier.
    """

    name = EXPERIMENT
    env_var = ENV_VAR
    what = "art classifier"

    def __init__(self, ckpt_path: str | Path | None = None, antialias: bool = True, net: nn.Module | None = None
                 ) -> None:
        super().__init__()
        if net is None:
            ckpt_path = classifier_ckpt(ckpt_path, self.name)
            net = load_classifier_net(ckpt_path, self.name, self.env_var, self.what)
        self.net = net.eval().requires_grad_(False)
        self.antialias = bool(antialias)
        self.ckpt_path = Path(ckpt_path) if ckpt_path else None
        self.weights = str(self.ckpt_path) if self.ckpt_path else "in-memory network"
        self.weights_sha256 = file_digest(self.ckpt_path) if self.ckpt_path else None
        self.input_size = int(net.image_size)
        self.in_channels = int(getattr(net, "channels", 3))
        self.num_features = int(net.feature_dim)
        self.num_classes = int(net.num_classes)
        self.feature_layer = f"penultimate ({self.num_features})"
        self.channels = "RGB, grey repeated to 3" if self.in_channels == 3 else "RGB averaged to grey"
        self.resize = f"centre crop to square, bilinear to {self.input_size} px when the size differs"

    def train(self, mode: bool = True) -> ArtClassifierFeatures:
        """Always in eval mode (BatchNorm statistics and dropout fixed)."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 1|3, H, W)`` → float ``(B, C, S, S)`` in ``[-1, 1]`` (``C``, ``S``: the network's).

        Raises:
            TypeError: for images that are not uint8.
            ValueError: for a shape other than ``(B, 1|3, H, W)``.
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"ArtClassifierFeatures expects uint8 images in [0, 255], got {images.dtype}")
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"ArtClassifierFeatures expects (B, 1|3, H, W) images, got {tuple(images.shape)}")
        x = images.float().div(127.5).sub(1)
        if self.in_channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif self.in_channels == 1 and x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        h, w = x.shape[-2:]
        if h != w:
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            x = x[..., top:top + side, left:left + side]
        size = self.input_size
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=self.antialias)
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 ``(B, 1|3, H, W)`` → ``{"features": (B, D), "logits": (B, num_classes)}`` float32."""
        return classifier_outputs(self.net, self.preprocess(images.to(next(self.net.parameters()).device)))


class ArtSimCLRFeatures(ArtClassifierFeatures):
    """Features of the self-supervised painting network (:class:`atelier.models.simclr.SimCLR`, ``python train.py
    experiment=art_simclr``): a second art yardstick that no label shaped.

    Input and preprocessing as :class:`ArtClassifierFeatures`. Output: ``{"features": (B, feature_dim) float32
    (≥ 0)}`` only: the network's head is a contrastive projection, not a classifier, so there are no logits, no IS
    and no class histogram (``num_classes`` is 0). Args and errors as :class:`ArtClassifierFeatures`; the default
    checkpoint is the pinned ``art_simclr`` weights, ``$ATELIER_ART_SIMCLR`` overrides it in the config.
    """

    name = "art_simclr"
    env_var = "ATELIER_ART_SIMCLR"
    what = "self-supervised art network"

    def __init__(self, ckpt_path: str | Path | None = None, antialias: bool = True, net: nn.Module | None = None
                 ) -> None:
        super().__init__(ckpt_path, antialias, net)
        self.num_classes = 0
        self.feature_layer = f"representation before the projection ({self.num_features})"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 ``(B, 1|3, H, W)`` → ``{"features": (B, D)}`` float32."""
        x = self.preprocess(images.to(next(self.net.parameters()).device))
        return {"features": self.net.features(x).float()}
