"""Stable Diffusion samplers under the names the DDPM uses (``ddpm``, ``ddim``, ``dpmpp``), set up for latents.

:data:`atelier.sampling.schedulers.SAMPLERS` is tuned for pixel-space DDPMs: its ``dpmpp`` clamps the x0 prediction
to ``[-1, 1]`` (dynamic thresholding), which is wrong for SD latents (about ``[-4, 4]`` after scaling). Here each
name is built from the pipeline's own training schedule (``scaled_linear`` betas, ``steps_offset``, prediction type)
with latent-appropriate settings: no thresholding and no x0 clipping.
"""

from __future__ import annotations

from typing import Any

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin

#: name -> (scheduler class, config overrides). ``ddpm``: ancestral sampling (Ho et al. 2020, Alg. 2);
#: ``ddim``: deterministic DDIM (Song et al. 2021, eta = 0); ``dpmpp``: DPM-Solver++(2M) (Lu et al. 2022).
SD_SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {"clip_sample": False, "thresholding": False}),
    "ddim": (DDIMScheduler, {"clip_sample": False, "thresholding": False, "set_alpha_to_one": False}),
    "dpmpp": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                            "thresholding": False}),
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
