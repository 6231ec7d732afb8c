"""The MNIST domain feature extractor: penultimate features and logits of the trained MNIST classifier.

Faster than Inception on a CPU and needs no download; numbers are comparable only with numbers from the same
classifier checkpoint (its SHA-256 is part of the protocol record and of the reference-cache key).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from atelier.metrics.pinned import classifier_ckpt
from atelier.metrics.protocol import file_digest


def load_classifier_net(ckpt_path: str | Path, experiment: str = "mnist_classifier",
                        env_var: str = "ATELIER_MNIST_CLASSIFIER", what: str = "MNIST classifier") -> nn.Module:
    """The ``ClassifierNet`` of a checkpoint written by ``python train.py experiment=<experiment>``.

    Args:
        ckpt_path: the checkpoint.
        experiment, env_var, what: named in the error messages (the experiment that writes the checkpoint to
            ``outputs/<experiment>/classifier.ckpt``, the variable that overrides the path, the classifier's name).

    Raises:
        FileNotFoundError: when the checkpoint is missing (naming the path, the config key and the command that
            makes it).
        TypeError: when the checkpoint holds another kind of model.
    """
    from atelier.tasks.sample import load_module

    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} checkpoint {path} does not exist. Train it with `python train.py "
            f"experiment={experiment}` (writes outputs/{experiment}/classifier.ckpt) and set "
            f"feature_extractor.ckpt_path (or ${env_var}) to it, or pin it as the packaged yardstick with "
            f"`python scripts/pin_feature_weights.py outputs/{experiment}/classifier.ckpt --name {experiment}`."
        )
    module = load_module(path)
    net = getattr(module, "net", None)
    if net is None or not callable(getattr(net, "features", None)):
        raise TypeError(f"feature_extractor.ckpt_path={path} holds a {type(module).__name__}, not a classifier "
                        f"(atelier.models.classifier.MNISTClassifier, python train.py experiment={experiment})")
    return net


class MNISTClassifierFeatures(nn.Module):
    """Penultimate features and class logits of :class:`atelier.models.classifier.ClassifierNet`.

    Input: ``(B, 1 | 3, H, W)`` uint8 in ``[0, 255]`` (RGB is averaged to grey). Images are scaled to ``[-1, 1]``;
    28-px images fed to a 32-px classifier are padded with 2 px of black (as ``MNISTDataModule`` does), other
    sizes are resized bilinearly with ``antialias``. Output: ``{"features": (B, feature_dim) float32,
    "logits": (B, 10) float32}``.

    Args:
        ckpt_path: classifier checkpoint (``python train.py experiment=mnist_classifier``); default: the pinned
            weights (:mod:`atelier.metrics.pinned`).
        antialias: antialiased resize for sizes that are not padded.
        net: a ``ClassifierNet`` to use instead of loading ``ckpt_path`` (tests, notebooks).
    """

    name = "mnist_classifier"
    channels = "RGB averaged to grey"
    #: the channels of the images it was trained on (digits); other data is refused (``suite.check_domain``)
    data_channels = 1
    resize = "28↔32 px by black padding/cropping, other sizes bilinear"

    def __init__(self, ckpt_path: str | Path | None = None, antialias: bool = False, net: nn.Module | None = None
                 ) -> None:
        super().__init__()
        if net is None:
            ckpt_path = classifier_ckpt(ckpt_path, self.name)
            net = load_classifier_net(ckpt_path)
        self.net = net.eval().requires_grad_(False)
        self.antialias = bool(antialias)
        self.ckpt_path = Path(ckpt_path) if ckpt_path else None
        self.weights = str(self.ckpt_path) if self.ckpt_path else "in-memory network"
        self.weights_sha256 = file_digest(self.ckpt_path) if self.ckpt_path else None
        self.input_size = int(net.image_size)
        self.num_features = int(net.feature_dim)
        self.num_classes = int(net.num_classes)
        self.feature_layer = f"penultimate ({self.num_features})"

    def train(self, mode: bool = True) -> MNISTClassifierFeatures:
        """Always in eval mode (BatchNorm statistics and dropout fixed)."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 1|3, H, W)`` → float ``(B, 1, S, S)`` in ``[-1, 1]`` at the classifier's size ``S``."""
        if images.dtype != torch.uint8:
            raise TypeError(f"MNISTClassifierFeatures expects uint8 images in [0, 255], got {images.dtype}")
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"MNISTClassifierFeatures expects (B, 1|3, H, W) images, got {tuple(images.shape)}")
        x = images.float().div(127.5).sub(1)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        size = self.input_size
        if tuple(x.shape[-2:]) == (28, 28) and size == 32:
            x = F.pad(x, (2, 2, 2, 2), value=-1.0)
        elif tuple(x.shape[-2:]) == (32, 32) and size == 28:
            x = x[..., 2:30, 2:30]
        elif tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=self.antialias)
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return classifier_outputs(self.net, self.preprocess(images.to(next(self.net.parameters()).device)))


def classifier_outputs(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A classifier net's penultimate ``features`` ``(B, D)`` and ``logits`` ``(B, num_classes)``, float32, for
    preprocessed inputs ``x`` ``(B, C, S, S)`` in ``[-1, 1]`` (the nets of ``atelier.models.classifier``)."""
    features = net.features(x)
    return {"features": features.float(), "logits": net.head(features).float()}
