"""The reverse-diffusion loop every sampler of :data:`atelier.sampling.schedulers.SAMPLERS` runs through."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from diffusers import SchedulerMixin

from atelier.sampling.interface import accepted_kwargs
from atelier.sampling.schedulers import step_kwargs
from atelier.utils.log_once import info_once
from atelier.utils.precision import autocast_dtype_for_cpu

log = logging.getLogger(__name__)

#: ``denoise(model_input, t)``: the network's prediction ``(B, C, H, W)`` for inputs ``(B, C, H, W)`` at timesteps
#: ``t`` ``(B,)`` (int64, or float for the Euler scheduler whose timesteps are floats).
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sampling_autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype that pays on ``device``: bf16 on a CPU where it was measured to pay (AMX, or AVX512-BF16 on
    AMD: :func:`atelier.utils.precision.cpu_bf16_pays`), bf16 on a CUDA GPU that supports it, else ``None``
    (stay in fp32)."""
    device = torch.device(device)
    if device.type == "cpu":
        return autocast_dtype_for_cpu()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def bf16_sampling(requested: bool | None, device: torch.device | str) -> bool:
    """Whether to pass ``autocast=True`` to ``DDPM.sample``: ``requested`` (the tasks' ``autocast`` key, the
    scripts' ``--autocast``) and bf16 autocast pays on ``device`` (:func:`sampling_autocast_dtype`). Resolved
    here so that the evaluation protocol records ``autocast: true`` only where the network really ran in bf16.
    Logs the choice once per device and request."""
    use = bool(requested) and sampling_autocast_dtype(device) is not None
    if requested:
        why = "bf16 pays on this CPU (atelier.utils.precision) or CUDA has bf16" if use else \
            "bf16 would not pay on this device"
        info_once(log, f"sampling precision: {'bf16 autocast' if use else 'fp32'} on {torch.device(device).type} "
                 f"({why}; autocast=false forces fp32)")
    return use


def autocast_kwargs(model: Any, requested: bool | None) -> dict[str, bool]:
    """``{"autocast": bool}`` for models whose ``sample`` takes it (DDPMs), resolved on the model's device by
    :func:`bf16_sampling`; ``{}`` for the others (GAN, VAE: fp32) and when ``requested`` is ``None``. The one place
    where the tasks, the scripts and the sample-grid callback turn an ``autocast`` request into a ``sample`` option.

    Raises:
        TypeError: when ``model`` has no ``sample`` method (:func:`atelier.sampling.interface.accepted_kwargs`).
    """
    if requested is None or not accepted_kwargs(model, {"autocast": True}, warn=False):
        return {}
    return {"autocast": bf16_sampling(requested, model.device)}


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` on ``device`` with ``dtype``, or a no-op context when ``dtype`` is ``None`` (fp32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def reverse_diffusion(
    scheduler: SchedulerMixin,
    denoise: Denoiser,
    noise: torch.Tensor,
    num_inference_steps: int,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Run ``num_inference_steps`` steps of ``scheduler`` from unit Gaussian ``noise`` ``(B, C, H, W)``.

    The loop is the same for every scheduler: ``set_timesteps``, the initial noise scaled by
    ``scheduler.init_noise_sigma`` (σ_max-sized for the Euler scheduler, 1 for the others), then per timestep
    ``scale_model_input`` (a no-op except for Euler), one ``denoise`` call (one NFE) and ``step``. ``step`` gets the
    caller's ``generator`` when it accepts one, so the same seed gives the same images for the stochastic samplers
    too, and ``eta`` when it accepts one (DDIM).

    Args:
        scheduler: a scheduler from :func:`atelier.sampling.schedulers.make_scheduler`; its state is reset here.
        denoise: the network's prediction, see :data:`Denoiser`.
        noise: ``(B, C, H, W)`` float32 standard normal noise, on the device to sample on.
        num_inference_steps: steps (= NFE for every registered sampler).
        generator: CPU ``torch.Generator`` for the schedulers' own noise.
        eta: DDIM's stochasticity (0: deterministic); ignored by schedulers whose ``step`` takes no ``eta``.
        autocast_dtype: run ``denoise`` under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``, see
            :func:`sampling_autocast_dtype`); ``None`` (default) keeps fp32. The scheduler's arithmetic always runs
            in fp32.

    Returns:
        ``(B, C, H, W)`` float32, unclamped (about ``[-1, 1]``).
    """
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    extra = step_kwargs(scheduler, generator, eta)
    x = noise * scheduler.init_noise_sigma
    b = x.shape[0]
    autocast = autocast_context(noise.device, autocast_dtype)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        with autocast:
            pred = denoise(model_in, t.expand(b))
        x = scheduler.step(pred.float(), t, x, **extra).prev_sample
    return x.float()
