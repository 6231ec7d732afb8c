"""Sampler registry: one name per diffusers scheduler, all built from the training noise schedule."""

from __future__ import annotations

from typing import Any

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin

#: name -> (scheduler class, config overrides). "ddpm" is ancestral sampling (Ho et al. 2020, Alg. 2);
#: "ddim" is deterministic DDIM (Song et al. 2021, eta = 0); "dpmpp" is DPM-Solver++(2M) (Lu et al. 2022).
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {"timestep_spacing": "trailing", "set_alpha_to_one": False}),
    # lambda_min_clipped keeps the cosine schedule's last, near-zero-SNR steps finite (diffusers' advice for
    # squaredcos_cap_v2); thresholding clamps the x0 prediction to the data range [-1, 1] (Saharia et al. 2022),
    # as DDIM's clip_sample does.
    "dpmpp": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "trailing",
         "lambda_min_clipped": -5.1, "thresholding": True, "sample_max_value": 1.0},
    ),
}


def make_scheduler(name: str, train_config: dict[str, Any]) -> SchedulerMixin:
    """Build the sampling scheduler ``name`` with the training noise schedule ``train_config``.

    Args:
        name: one of :data:`SAMPLERS` (``ddpm``, ``ddim``, ``dpmpp``).
        train_config: the training scheduler's config (``beta_schedule``, ``num_train_timesteps``,
            ``prediction_type``, ...), e.g. ``DDPMScheduler.config``.

    Raises:
        ValueError: if ``name`` is not a known sampler; the message lists the allowed names.
    """
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r} is not known; allowed values: {sorted(SAMPLERS)}")
    cls, overrides = SAMPLERS[name]
    # overrides as keyword arguments: a dict config would reset keys listed in its `_use_default_values`
    return cls.from_config(train_config, **overrides)
