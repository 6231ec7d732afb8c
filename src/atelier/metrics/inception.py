"""The standard FID Inception-v3 (torch-fidelity's ``pt_inception-2015-12-05``) as an Atelier feature extractor.

The network and its TensorFlow-1-compatible resize come from torch-fidelity through torchmetrics'
``NoTrainInceptionV3`` wrapper, so numbers match torch-fidelity and the published FID code (Heusel et al. 2017)
when ``antialias=False``. Weights are read from a local file; when it is missing they are downloaded once (if
allowed) into torch's hub cache, and otherwise the error names the file, the folder and the URL.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atelier.metrics.protocol import file_digest

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"


def default_weights_path() -> Path:
    """Where torch-fidelity (``torch.hub``) keeps the weights: ``$TORCH_HOME/hub/checkpoints/<WEIGHTS_FILE>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def resolve_weights(weights_path: str | Path | None, download: bool) -> Path:
    """The local Inception weights file, downloading it to the default place first when allowed.

    Raises:
        FileNotFoundError: when the file is absent (and could not be downloaded); the message names the file,
            the folder to put it in and the URL, and the config key ``feature_extractor.weights_path``.
    """
    path = Path(weights_path).expanduser() if weights_path else default_weights_path()
    if path.is_file():
        return path
    reason = "it does not exist"
    if download and not weights_path:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            log.info("downloading Inception weights %s to %s", WEIGHTS_URL, path)
            torch.hub.download_url_to_file(WEIGHTS_URL, str(path), progress=False)
            return path
        except Exception as err:  # no network, proxy errors, HTTP errors
            reason = f"it does not exist and downloading it failed ({type(err).__name__}: {err})"
    raise FileNotFoundError(
        f"Inception weights file {path.name} not found in {path.parent} ({reason}). Download {WEIGHTS_URL} and "
        f"put it in {path.parent} (the torch hub checkpoints folder, $TORCH_HOME/hub/checkpoints), or set "
        f"feature_extractor.weights_path=/path/to/{WEIGHTS_FILE}."
    )


def _inception_class() -> type[nn.Module]:
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as err:  # pragma: no cover - torchmetrics is a dependency
        raise ModuleNotFoundError("the Inception extractor needs torchmetrics and torch-fidelity") from err
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError("feature_extractor=inception needs torch-fidelity: pip install torch-fidelity")

    class _Inception(NoTrainInceptionV3):
        """torchmetrics' wrapper; ``load_state_dict(None)`` keeps the random initialisation (tests only)."""

        def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
            if state_dict is None:
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    return _Inception


@contextmanager
def _no_download() -> Any:
    """Make torch-fidelity's weight download return ``None`` (random weights; used by tests)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    original = tfi.load_state_dict_from_url
    tfi.load_state_dict_from_url = lambda *args, **kwargs: None
    try:
        yield
    finally:
        tfi.load_state_dict_from_url = original


class InceptionFeatures(nn.Module):
    """Inception-v3 pool3 features and unbiased logits from uint8 images, one network pass for both.

    Input: ``(B, 1 | 3, H, W)`` uint8 in ``[0, 255]`` (grey is repeated to 3 channels), any ``H, W``; resized to
    299 px inside (``antialias=False``: torch-fidelity's TF1-compatible bilinear; ``True``: torch's antialiased
    bilinear, torchmetrics' default since 1.8). Output: ``{"features": (B, 2048) float32,
    "logits": (B, 1008) float32}`` (``logits_unbiased``, what torchmetrics' ``InceptionScore`` uses).

    Args:
        weights_path: local weights file (default: :func:`default_weights_path`).
        antialias: resize with antialiasing (``False`` to match published numbers).
        download: download the weights to the default place when they are missing.
        random_weights: keep the random initialisation (tests only; numbers are meaningless).
    """

    name = "inception"
    num_features = 2048
    num_classes = 1008
    input_size = 299
    feature_layer = "pool3 (2048)"
    channels = "grey repeated to 3"

    def __init__(self, weights_path: str | Path | None = None, antialias: bool = False, download: bool = True,
                 random_weights: bool = False) -> None:
        super().__init__()
        self.antialias = bool(antialias)
        cls = _inception_class()
        features = ["2048", "logits_unbiased"]
        if random_weights:
            self.weights_path = None
            with _no_download():
                self.net = cls("inception-v3-compat", features, None, antialias=self.antialias)
        else:
            self.weights_path = resolve_weights(weights_path, download and os.environ.get("ATELIER_OFFLINE") != "1")
            self.net = cls("inception-v3-compat", features, str(self.weights_path), antialias=self.antialias)
        self.weights = self.weights_path.name if self.weights_path else "random (tests only)"
        self.weights_sha256 = file_digest(self.weights_path)
        self.resize = "bilinear (torch, antialiased)" if self.antialias else "bilinear (torch-fidelity TF1-compatible)"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8:
            raise TypeError(f"InceptionFeatures expects uint8 images in [0, 255], got {images.dtype}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise ValueError(f"InceptionFeatures expects 1 or 3 channels, got shape {tuple(images.shape)}")
        features, logits = self.net._torch_fidelity_forward(images)
        return {"features": features.float(), "logits": logits.float()}
