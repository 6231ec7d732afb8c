"""The sampling contract shared by every generative module (DDPM, GAN, VAE).

Every Atelier generative LightningModule has ``sample(n, generator=None, **options) -> (n, C, H, W)`` float32
in ``[-1, 1]``; the same ``generator`` seed gives the same images. Options differ between families (``sampler``
and ``num_inference_steps`` for DDPM, ``labels`` for conditional models, ``batch_size`` for all);
:func:`accepted_kwargs` keeps the ones a module takes, so callers (the sample-grid callback, ``sample.py``) can
pass one set of options to any family. A module may also define ``visualizations(generator, images)``
returning ``{name: (images, nrow)}`` for extra grids (latent interpolations, reconstructions).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)


class Generative(Protocol):
    """What the sample-grid callback and the sample task rely on."""

    def sample(self, n: int, generator: torch.Generator | None = None, **options: Any) -> torch.Tensor: ...


def accepted_kwargs(model: Any, options: dict[str, Any], warn: bool = True) -> dict[str, Any]:
    """The entries of ``options`` that are not ``None`` and that ``model.sample`` accepts by name; the others
    are dropped with a warning (when ``warn``).

    Raises:
        TypeError: when ``model`` has no ``sample`` method.
    """
    if not callable(getattr(model, "sample", None)):
        raise TypeError(f"{type(model).__name__} has no sample(n, generator) method")
    accepted = inspect.signature(model.sample).parameters
    ignored = [k for k, v in options.items() if v is not None and k not in accepted]
    if ignored and warn:
        log.warning("%s.sample does not take %s; ignored", type(model).__name__, ignored)
    return {k: v for k, v in options.items() if v is not None and k in accepted}
