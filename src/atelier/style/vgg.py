"""VGG-19 (Simonyan & Zisserman 2015) as a frozen feature extractor for the style-transfer losses.

Style transfer measures images through the activations of an ImageNet-trained VGG-19 (Gatys et al. 2016,
Johnson et al. 2016, Huang & Belongie 2017). Layers are named as in those papers: ``conv<block>_<i>``,
``relu<block>_<i>``, ``pool<block>``; ``relu4_2`` is the usual content layer and ``relu1_1`` … ``relu5_1`` the
usual style layers.

Weights come through torchvision's weights API (``VGG19_Weights.IMAGENET1K_V1``, downloaded once to
``torch.hub.get_dir()/checkpoints``). ``weights="random"`` gives a randomly initialised network, seeded so that
the same ``seed`` always builds the same network: useful for tests and plumbing, never for real stylisation.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models import VGG19_Weights, vgg19

log = logging.getLogger(__name__)

WEIGHT_CHOICES = ("imagenet", "random")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the convolutions of each block of VGG-19's ``features`` (configuration "E")
_BLOCKS = (2, 2, 4, 4, 4)


def _layer_names() -> list[str]:
    """Names of the 37 modules of ``torchvision.models.vgg19().features`` in order."""
    names = []
    for block, convs in enumerate(_BLOCKS, start=1):
        for i in range(1, convs + 1):
            names += [f"conv{block}_{i}", f"relu{block}_{i}"]
        names.append(f"pool{block}")
    return names


LAYER_NAMES: tuple[str, ...] = tuple(_layer_names())
CONTENT_LAYERS: tuple[str, ...] = ("relu4_2",)
STYLE_LAYERS: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


class VGGWeightsError(RuntimeError):
    """The ImageNet VGG-19 weights could not be loaded (offline machine, corrupt file)."""


def weights_file() -> Path:
    """Where torchvision looks for the VGG-19 weights: ``torch.hub.get_dir()/checkpoints/vgg19-dcbb9e9d.pth``
    (``$TORCH_HOME/hub/checkpoints/``; ``~/.cache/torch/hub/checkpoints/`` by default)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG19_Weights.IMAGENET1K_V1.url).name


def load_vgg19(weights: str = "imagenet", seed: int = 0) -> nn.Sequential:
    """The ``features`` part of torchvision's VGG-19 (convolutions, ReLUs, max pools; 20.0 M parameters).

    Args:
        weights: ``imagenet`` (torchvision ``VGG19_Weights.IMAGENET1K_V1``) or ``random`` (torchvision's own
            initialisation, drawn from a private generator seeded with ``seed``; the global RNG is untouched).
        seed: seed of the random initialisation.

    Raises:
        ValueError: for another ``weights`` value.
        VGGWeightsError: when the ImageNet weights cannot be loaded; the message names the file
            ``vgg19-dcbb9e9d.pth``, the folder to put it in and where to download it.
    """
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"vgg_weights={weights!r} is not allowed; choose one of {list(WEIGHT_CHOICES)}")
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return vgg19(weights=None).features
    try:
        return vgg19(weights=VGG19_Weights.IMAGENET1K_V1).features
    except Exception as err:  # offline: URLError; a truncated or corrupt file: RuntimeError, UnpicklingError, ...
        path = weights_file()
        raise VGGWeightsError(
            f"cannot load the pretrained VGG-19 weights ({type(err).__name__}: {err}). Put the file "
            f"{path.name} (from {VGG19_Weights.IMAGENET1K_V1.url}) into {path.parent}/ "
            f"(that is $TORCH_HOME/hub/checkpoints/, i.e. torch.hub.get_dir()/checkpoints) and run again. "
            f"vgg_weights=random builds an untrained VGG-19 for tests only: its output is not a style transfer."
        ) from err


class VGGFeatures(nn.Module):
    """Frozen VGG-19 returning the activations of named layers.

    Input: ``(B, 3, H, W)`` (or ``(B, 1, H, W)``, repeated to RGB) float images in ``[-1, 1]``; they are mapped
    to ``[0, 1]`` and normalised with the ImageNet mean and std inside. Output: ``{name: (B, C_l, H_l, W_l)}``
    for every requested layer (``H_l = H / 2^(block-1)`` for ``relu<block>_<i>``). The network is cut after the
    deepest requested layer, its parameters do not require gradients and it stays in eval mode; gradients flow
    to the input, as the Gatys optimisation and the feed-forward losses need.

    Args:
        layers: layer names from :data:`LAYER_NAMES` (e.g. ``["relu1_1", "relu4_2"]``).
        weights: ``imagenet`` or ``random`` (see :func:`load_vgg19`).
        pool: ``max`` (torchvision's network) or ``avg`` (average pooling, which Gatys et al. 2016 found to give
            slightly smoother results; same weights).
        seed: seed of random weights.

    Raises:
        ValueError: for an unknown layer name (listing the valid ones) or ``pool``.
        VGGWeightsError: when the ImageNet weights are unavailable.
    """

    def __init__(self, layers: Sequence[str], weights: str = "imagenet", pool: str = "max", seed: int = 0) -> None:
        super().__init__()
        layers = list(dict.fromkeys(layers))
        unknown = [name for name in layers if name not in LAYER_NAMES]
        if unknown or not layers:
            raise ValueError(f"unknown VGG-19 layer(s) {unknown or layers}; choose from {list(LAYER_NAMES)}")
        if pool not in ("max", "avg"):
            raise ValueError(f"pool={pool!r} is not allowed; choose 'max' or 'avg'")
        features = load_vgg19(weights, seed)
        last = max(LAYER_NAMES.index(name) for name in layers)
        modules = []
        for name, module in zip(LAYER_NAMES[: last + 1], features[: last + 1], strict=True):
            if isinstance(module, nn.ReLU):
                module = nn.ReLU(inplace=False)  # a captured activation must not be overwritten by the next ReLU
            elif isinstance(module, nn.MaxPool2d) and pool == "avg":
                module = nn.AvgPool2d(kernel_size=2, stride=2)
            modules.append((name, module))
        self.net = nn.Sequential(OrderedDict(modules))
        self.layers = layers
        self.weights = weights
        # every pool before the deepest layer halves the image: it must keep at least one pixel
        self.deepest = LAYER_NAMES[last]
        self.min_size = 2 ** sum(1 for name in LAYER_NAMES[:last] if name.startswith("pool"))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGGFeatures:
        """Always stays in eval mode (VGG-19 has no dropout or batch norm in ``features``, but be explicit)."""
        return super().train(False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` RGB (or greyscale) → ImageNet-normalised RGB, ``(B, 3, H, W)``."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"a {x.shape[-2]}x{x.shape[-1]} px image is too small for VGG-19 layer "
                             f"{self.deepest}: each side needs at least {self.min_size} px (raise size / style_size)")
        out: dict[str, torch.Tensor] = {}
        h = self.normalize(x)
        for name, module in self.net.named_children():
            h = module(h)
            if name in self.layers:
                out[name] = h
                if len(out) == len(self.layers):
                    break
        return out

    @property
    def channels(self) -> dict[str, int]:
        """Channels of each requested layer (64, 128, 256, 512, 512 for blocks 1-5)."""
        return {name: layer_channels(name) for name in self.layers}


def layer_channels(name: str) -> int:
    """Channels of a VGG-19 layer: 64, 128, 256, 512, 512 for blocks 1-5 (``relu4_1`` → 512)."""
    block = int(next(ch for ch in name if ch.isdigit()))
    return (64, 128, 256, 512, 512)[block - 1]


class LazyVGG:
    """A :class:`VGGFeatures` built on first use and kept outside the owning module's parameters.

    LightningModules hold their frozen loss network through this so that it is neither saved in checkpoints
    (80 MB of fixed ImageNet weights; random weights are rebuilt from ``seed``) nor required to load a checkpoint
    for inference that does not need it (the feed-forward transformation network).
    """

    def __init__(self, layers: Sequence[str], weights: str = "imagenet", pool: str = "max", seed: int = 0) -> None:
        if weights not in WEIGHT_CHOICES:
            raise ValueError(f"model.vgg_weights={weights!r} is not allowed; choose one of {list(WEIGHT_CHOICES)}")
        self.layers, self.weights, self.pool, self.seed = list(layers), weights, pool, seed
        self._net: VGGFeatures | None = None

    def get(self, device: torch.device | str | None = None) -> VGGFeatures:
        """The network on ``device`` (built, and the weights loaded, on the first call)."""
        if self._net is None:
            self._net = VGGFeatures(self.layers, self.weights, self.pool, self.seed)
            if self.weights == "random":
                log.warning("VGG-19 with RANDOM weights (vgg_weights=random): fine for tests, but its losses do not "
                            "measure style or content; outputs are not style transfer results")
        if device is not None and self._net.mean.device != torch.device(device):
            self._net.to(device)
        return self._net
