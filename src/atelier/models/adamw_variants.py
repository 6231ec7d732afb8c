"""Which AdamW implementation trains an adapter: PyTorch's default, fused, or bitsandbytes' 8-bit
(``model.optimizer_variant`` of :class:`atelier.models.sd_lora.StableDiffusionLoRA`), and :func:`adamw_variant`, which
logs that choice once per process (also importable from :mod:`atelier.models.sd_lora`)."""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable

import torch

from atelier.models.optim import OptimizerFactory
from atelier.utils.log_once import info_once

log = logging.getLogger(__name__)

#: ``optimizer_variant`` values (applied when the optimizer is ``torch.optim.AdamW``)
OPTIMIZER_VARIANTS = ("adamw", "auto", "fused", "8bit")


def check_optimizer_variant(variant: str) -> None:
    """Raises ``ValueError`` for a ``model.optimizer_variant`` not in :data:`OPTIMIZER_VARIANTS`."""
    if variant not in OPTIMIZER_VARIANTS:
        raise ValueError(f"model.optimizer_variant={variant!r} is not allowed; choose one of {OPTIMIZER_VARIANTS}")


def select_adamw(factory: OptimizerFactory, variant: str, device: torch.device,
                 note: Callable[[str], None] = log.info) -> OptimizerFactory:
    """The optimiser factory for ``variant`` when ``factory`` is a partial of ``torch.optim.AdamW``.

    * ``adamw``: ``factory`` as it is (PyTorch's default, the multi-tensor ``foreach`` kernels).
    * ``fused``: ``AdamW(fused=True)`` (one kernel for all parameters) on CUDA.
    * ``8bit``: bitsandbytes' ``AdamW8bit`` (optimizer state in 8 bits) on CUDA with bitsandbytes installed.
    * ``auto``: ``fused`` on CUDA, ``adamw`` elsewhere. (8-bit state is not the default: the optimizer state of a
      LoRA is a few MB (two fp32 moments of 0.8-13 M parameters at rank 4-64 on SD 1.5), so 8 bits save at most
      ~0.1 GB and add quantization noise; they pay for full fine-tuning.)

    Where a variant is not available it falls back (``8bit`` → ``fused`` → ``adamw``) with one info line; for another
    optimiser class ``factory`` is returned unchanged (one info line unless ``variant`` is ``adamw``). Info lines go
    to ``note`` (one formatted line per call).

    Raises:
        ValueError: for a variant not in :data:`OPTIMIZER_VARIANTS`.
    """
    check_optimizer_variant(variant)
    if variant == "adamw":
        return factory
    if not (isinstance(factory, functools.partial) and factory.func is torch.optim.AdamW):
        note(f"model.optimizer_variant={variant} applies to torch.optim.AdamW only; using the configured optimizer "
             "as it is")
        return factory
    cuda = device.type == "cuda"
    if variant == "8bit":
        if cuda and importlib.util.find_spec("bitsandbytes") is not None:
            import bitsandbytes as bnb

            note("optimizer: bitsandbytes AdamW8bit (8-bit optimizer state)")
            return functools.partial(bnb.optim.AdamW8bit, *factory.args, **factory.keywords)
        note("model.optimizer_variant=8bit needs CUDA and bitsandbytes ({}); falling back to {}".format(
            "no CUDA device" if not cuda else "bitsandbytes not installed", "fused AdamW" if cuda else "AdamW"))
    elif variant == "fused" and not cuda:
        note(f"model.optimizer_variant=fused: fused AdamW is used on CUDA only; falling back to AdamW on {device.type}")
    if cuda:
        note("optimizer: fused AdamW (AdamW(fused=True))")
        return functools.partial(torch.optim.AdamW, *factory.args, **{**factory.keywords, "fused": True})
    return factory


def adamw_variant(factory: OptimizerFactory, variant: str, device: torch.device) -> OptimizerFactory:
    """The optimiser factory for ``model.optimizer_variant`` (:func:`select_adamw`: ``adamw``, ``fused``, ``8bit``
    or ``auto``, with fallbacks), its info lines logged once per process.

    Raises:
        ValueError: for a variant not in :data:`OPTIMIZER_VARIANTS`.
    """
    return select_adamw(factory, variant, device, note=functools.partial(info_once, log))
