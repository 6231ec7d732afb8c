"""Stable Diffusion samplers under the names the DDPM uses (``ddpm``, ``ddim``, ``dpmpp``, ...), set up for latents.

:data:`atelier.sampling.schedulers.SAMPLERS` is tuned for pixel-space DDPMs: its ``dpmpp`` clamps the x0 prediction
to ``[-1, 1]`` (dynamic thresholding), which is wrong for SD latents (about ``[-4, 4]`` after scaling). Here each
name is built from the pipeline's own training schedule (``scaled_linear`` betas, ``steps_offset``, prediction type)
with latent-appropriate settings: no thresholding and no x0 clipping.
"""

from __future__ import annotations

import inspect
from typing import Any

from diffusers import SchedulerMixin

from atelier.sampling.schedulers import SAMPLERS

#: settings of :data:`atelier.sampling.schedulers.SAMPLERS` that are about pixels in ``[-1, 1]`` (or the cosine
#: schedule's last steps), dropped for latents
PIXEL_ONLY = ("thresholding", "sample_max_value", "lambda_min_clipped", "clip_sample")


def _latent_overrides(cls: type[SchedulerMixin], overrides: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in overrides.items() if k not in PIXEL_ONLY}
    accepted = inspect.signature(cls.__init__).parameters
    kept.update({k: False for k in ("thresholding", "clip_sample") if k in accepted})
    return kept


#: name -> (scheduler class, config overrides): every sampler of the pixel-space registry, under the same name and
#: with the same solver settings, without thresholding or x0 clipping.
SD_SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    name: (spec.scheduler, _latent_overrides(spec.scheduler, spec.overrides)) for name, spec in SAMPLERS.items()
}


def make_sd_scheduler(name: str, pipeline_config: dict[str, Any]) -> SchedulerMixin:
    """The sampler ``name`` with the noise schedule of a pipeline's scheduler config (``pipe.scheduler.config``).

    Raises:
        ValueError: for an unknown name; the message names the key ``sampler`` and lists the allowed values.
    """
    if name not in SD_SAMPLERS:
        raise ValueError(f"sampler={name!r} is not known; allowed values: {sorted(SD_SAMPLERS)}")
    cls, overrides = SD_SAMPLERS[name]
    return cls.from_config(pipeline_config, **overrides)
