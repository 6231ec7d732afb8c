"""Sampling of a :class:`atelier.models.ddpm.DDPM`: the batched reverse-diffusion loop with classifier-free
guidance, autoguidance and a limited guidance interval (``DDPM.sample`` documents the options)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from atelier.sampling.edm import denoiser, heun_sample, make_edm_scheduler
from atelier.sampling.guidance import autoguided_prediction, conditioning_labels, guided_prediction, in_interval
from atelier.sampling.loop import autocast_context, reverse_diffusion, sampling_autocast_dtype
from atelier.sampling.schedulers import make_scheduler

if TYPE_CHECKING:
    from atelier.models.ddpm import DDPM


def noise_sigma(model: DDPM, t: torch.Tensor) -> float:
    """The noise level σ of the step at which the network is called with timesteps ``t`` ``(B,)`` (all equal).

    VP schedules (``parameterization=ddpm``): ``t`` is a training timestep (int64, or float for Euler ancestral,
    rounded) and ``σ = √((1 − ᾱ_t) / ᾱ_t)``, the noise-to-signal ratio of ``x_t``. EDM: ``t`` is
    ``c_noise = ¼ ln σ``, so ``σ = exp(4 t)``.
    """
    t0 = float(t.flatten()[0])
    if model.edm is not None:
        return math.exp(4.0 * t0)
    index = min(max(round(t0), 0), model.snr.numel() - 1)
    return float(model.snr[index].rsqrt())


def check_interval(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    """``interval`` as two floats, after checking it is ``(σ_lo, σ_hi)`` with ``0 ≤ σ_lo < σ_hi`` (``None`` passes).

    Raises:
        ValueError: naming ``guidance_interval`` and what it got.
    """
    if interval is None:
        return None
    values = list(interval)
    if len(values) != 2 or not 0 <= float(values[0]) < float(values[1]):
        raise ValueError(f"guidance_interval={values} must be two noise levels [σ_lo, σ_hi] with 0 ≤ σ_lo < σ_hi "
                         "(e.g. [0.28, 5.42]), or null to guide at every step")
    return float(values[0]), float(values[1])


def sampling_labels(model: DDPM, n: int, labels: torch.Tensor | None,
                    guidance_scale: float) -> torch.Tensor | None:
    """``(n,)`` int64 labels on ``model.device`` for a conditional model (default: consecutive rows per class,
    :func:`atelier.sampling.guidance.rows_per_class`), ``None`` for an unconditional one.

    Raises:
        ValueError: labels or a guidance scale other than 1 for an unconditional model; labels of the wrong length
            or outside ``[0, num_classes)``.
    """
    if model.num_classes is None:
        if labels is not None or guidance_scale != 1.0:
            raise ValueError("labels / guidance_scale need a class-conditional DDPM (model.num_classes set); "
                             "this model is unconditional")
        return None
    return conditioning_labels(n, labels, model.num_classes, model.device)


def sampling_scheduler(model: DDPM, sampler: str) -> object:
    """A fresh diffusers scheduler for ``sampler`` on ``model``'s noise schedule (EDM or VP)."""
    if model.edm is not None:
        return make_edm_scheduler(sampler, model.edm)
    return make_scheduler(sampler, model.noise_scheduler.config)


def draw(model: DDPM, n: int, generator: torch.Generator | None, sampler: str | None,
         num_inference_steps: int | None, eta: float, batch_size: int, use_ema: bool, labels: torch.Tensor | None,
         guidance_scale: float | None, autocast: bool, guide: nn.Module | None, autoguidance_scale: float,
         guidance_interval: tuple[float, float] | None) -> torch.Tensor:
    """The body of :meth:`atelier.models.ddpm.DDPM.sample` (same arguments, returns and errors)."""
    if n < 1:
        raise ValueError(f"n={n}: draw at least 1 image (num_samples >= 1)")
    if num_inference_steps is not None and num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps} is not allowed; a sampler needs at least 1 step")
    if autoguidance_scale != 1.0 and guide is None:
        raise ValueError(f"autoguidance_scale={autoguidance_scale} needs a guide network (guide_ckpt_path=...)")
    interval = check_interval(guidance_interval)
    sampler = sampler or model.hparams.sampler
    w = float(model.hparams.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
    labels = sampling_labels(model, n, labels, w)
    steps = num_inference_steps or model.hparams.num_inference_steps
    scheduler = sampling_scheduler(model, sampler)
    net = model.ema.module if use_ema else model.net
    was_training = net.training
    net.eval()
    guide_was_training = guide is not None and guide.training
    if guide is not None:
        guide.eval()
    dtype = sampling_autocast_dtype(model.device) if autocast else None
    out = []
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            noise = randn_tensor((b, *model.image_shape), generator=generator, device=model.device)
            y = None if labels is None else labels[start:start + b]

            def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = y) -> torch.Tensor:
                active = interval is None or in_interval(noise_sigma(model, t), interval)
                w_cfg = w if active else 1.0

                def predict(net_: nn.Module, x_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
                    if y is None:
                        return model.predict(net_, x_, t_)
                    return guided_prediction(lambda xx, tt, yy: model.predict(net_, xx, tt, yy), x_, t_, y,
                                             model.num_classes, w_cfg)

                if guide is None:
                    return predict(net, x, t)
                return autoguided_prediction(predict, net, guide, x, t, autoguidance_scale if active else 1.0)

            if sampler == "edm_heun":
                scheduler.set_timesteps(steps)
                with autocast_context(model.device, dtype):
                    x = heun_sample(denoiser(denoise, model.edm.sigma_data), noise, scheduler.sigmas, generator,
                                    s_churn=model.hparams.get("s_churn", 0.0))
            else:
                x = reverse_diffusion(scheduler, denoise, noise, steps, generator, eta, dtype)
            out.append(x.clamp(-1, 1).float())
    finally:
        net.train(was_training)
        if guide is not None:
            guide.train(guide_was_training)
    return torch.cat(out)


def guided_steps(model: DDPM, sampler: str | None, num_inference_steps: int | None,
                 guidance_interval: tuple[float, float] | None) -> int:
    """How many of the sampler's steps fall inside ``guidance_interval`` (all of them for ``None``): with
    autoguidance each of those costs one extra network call, so NFE = steps + this count.

    Raises:
        ValueError: for ``edm_heun`` with an interval (its second-order calls are not counted here) and for an
            invalid interval (:func:`check_interval`).
    """
    sampler = sampler or model.hparams.sampler
    steps = num_inference_steps or model.hparams.num_inference_steps
    interval = check_interval(guidance_interval)
    if interval is None:
        return steps
    if sampler == "edm_heun":
        raise ValueError("guided_steps does not count edm_heun's calls within a guidance_interval")
    scheduler = sampling_scheduler(model, sampler)
    scheduler.set_timesteps(steps)
    return sum(in_interval(noise_sigma(model, t.reshape(1)), interval) for t in scheduler.timesteps)
