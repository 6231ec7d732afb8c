"""Style images for arbitrary style transfer: a folder of paintings sampled as random crops.

AdaIN (Huang & Belongie 2017) trains on (content, style) pairs. Content images come from any Atelier datamodule;
style images from this sampler, which the module draws from inside its training step (one style per content
image), so any datamodule can serve as the content source.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torchvision.transforms import v2

from atelier.data.art_folder import IMAGE_EXTENSIONS, find_images, split_readable
from atelier.style.io import load_image

log = logging.getLogger(__name__)


class StyleImages:
    """Every image under ``root`` (recursive), served as square crops ``(3, size, size)`` in ``[-1, 1]``.

    Each image is resized once so that its shorter side is ``scale · size`` px (the AdaIN recipe: short side 512,
    random 256 crops, i.e. ``scale = 2``) and kept in an LRU cache of ``cache_size`` images; training crops are
    random (position and horizontal flip, from the global RNG), :meth:`fixed` crops are central.

    Args:
        root: folder of style images (config key ``model.style_dir``).
        size: crop size in px.
        scale: shorter side before cropping, in multiples of ``size`` (>= 1).
        cache_size: decoded images kept in memory.

    Raises:
        FileNotFoundError: when ``root`` does not exist or holds no readable image (naming it).
        ValueError: for ``scale < 1``.
    """

    def __init__(self, root: str | Path, size: int, scale: float = 2.0, cache_size: int = 512) -> None:
        self.root = Path(root).expanduser()
        if scale < 1:
            raise ValueError(f"model.style_scale must be >= 1, got {scale}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"model.style_dir={self.root} does not exist or is not a folder")
        paths, bad = split_readable(find_images(self.root))
        if bad:
            log.warning("skipped %d unreadable style image(s): %s", len(bad), ", ".join(map(str, bad[:20])))
        if not paths:
            raise FileNotFoundError(f"model.style_dir={self.root} holds no readable image "
                                    f"({', '.join(IMAGE_EXTENSIONS)})")
        self.paths = paths
        self.size = size
        self.short_side = max(size, round(scale * size))
        self.cache_size = cache_size
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._random = v2.Compose([v2.RandomCrop(size), v2.RandomHorizontalFlip()])
        self._centre = v2.CenterCrop(size)

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> torch.Tensor:
        """Style image ``i`` resized to the working scale: ``(3, H, W)`` in ``[-1, 1]``, shorter side
        ``scale · size``."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        x = load_image(self.paths[i])[0]
        x = v2.functional.resize(x, self.short_side, antialias=True)
        self._cache[i] = x
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return x

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` random crops of uniformly drawn style images: ``(n, 3, size, size)`` in ``[-1, 1]``."""
        idx = torch.randint(len(self.paths), (n,), generator=generator)
        return torch.stack([self._random(self.image(int(i))) for i in idx])

    def fixed(self, n: int) -> torch.Tensor:
        """Central crops of style images ``0, 1, …`` (cycled): ``(n, 3, size, size)``, the same every call."""
        return torch.stack([self._centre(self.image(i % len(self.paths))) for i in range(n)])
