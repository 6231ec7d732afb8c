"""The dtype of the frozen parts of Stable Diffusion during adapter training (``model.frozen_precision`` of
:class:`atelier.models.sd_lora.StableDiffusionLoRA`): the VAE and text encoder only encode, so they can run in bf16
where that is fast, while the trained UNet keeps its dtype."""

from __future__ import annotations

import torch

from atelier.utils.precision import cpu_bf16_pays

#: ``frozen_precision`` values: dtype of the frozen VAE and text encoder
FROZEN_PRECISIONS = ("auto", "fp32", "bf16")


def check_frozen_precision(precision: str) -> None:
    """Raises ``ValueError`` for a ``model.frozen_precision`` not in :data:`FROZEN_PRECISIONS`."""
    if precision not in FROZEN_PRECISIONS:
        raise ValueError(f"model.frozen_precision={precision!r} is not allowed; choose one of {FROZEN_PRECISIONS}")


def frozen_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen VAE and text encoder for ``precision`` on ``device``.

    ``auto``: bf16 on CUDA; on a CPU bf16 only where it pays, i.e. with AMX or AVX512-BF16 on AMD
    (:func:`atelier.utils.precision.cpu_bf16_pays`; elsewhere bf16 convolutions run at a fraction of fp32
    speed); fp32 elsewhere (MPS, other CPUs). ``fp32`` and ``bf16`` are taken as they are.

    Raises:
        ValueError: for a value not in :data:`FROZEN_PRECISIONS`.
    """
    check_frozen_precision(precision)
    if precision == "bf16" or (precision == "auto" and (
            device.type == "cuda" or (device.type == "cpu" and cpu_bf16_pays()))):
        return torch.bfloat16
    return torch.float32
