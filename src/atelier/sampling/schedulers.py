"""Sampler registry: one name per diffusers scheduler, all built from the training noise schedule.

Every entry is a diffusers scheduler created with ``cls.from_config(train_config, **overrides)``, so it keeps the
training run's ``beta_schedule``, ``num_train_timesteps`` and ``prediction_type`` and changes only how the reverse
process is discretised. Shared settings, where the scheduler has them:

- ``timestep_spacing="trailing"``: the first step starts at ``t = T - 1`` (pure noise), which matters at few steps
  (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2);
- ``lambda_min_clipped=-5.1``: keeps the cosine schedule's last, near-zero-SNR steps finite (diffusers' advice for
  ``squaredcos_cap_v2``);
- ``thresholding=True, sample_max_value=1.0``: clamps the x0 prediction to the data range ``[-1, 1]`` (Saharia et
  al. 2022), as DDPM's and DDIM's ``clip_sample`` do.

Every sampler here costs one network evaluation (NFE) per step: the multistep solvers (DPM-Solver++, UniPC,
SA-Solver) reuse the previous steps' predictions instead of evaluating the network again. Randomness (initial
noise, ancestral and SDE noise) comes only from the caller's ``generator``: see :func:`step_kwargs`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    SASolverScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)


@dataclass(frozen=True)
class SamplerSpec:
    """One registry entry.

    Attributes:
        scheduler: the diffusers scheduler class.
        overrides: config keys set on top of the training schedule's config.
        order: the solver's order of accuracy (for UniPC the predictor's; its corrector adds one).
        stochastic: whether a step draws fresh noise (``ddim`` only when ``eta > 0``).
        nfe_per_step: network evaluations per step (classifier-free guidance batches both passes into one).
        paper: the method's reference.
    """

    scheduler: type[SchedulerMixin]
    overrides: dict[str, Any] = field(default_factory=dict)
    order: int = 1
    stochastic: bool = False
    nfe_per_step: int = 1
    paper: str = ""


class SDEDPMSolver3MScheduler(DPMSolverMultistepScheduler):
    """``DPMSolverMultistepScheduler`` whose third-order ``sde-dpmsolver++`` step has the right sign.

    diffusers (checked with 0.42.1; the branch came with huggingface/diffusers#9104) writes the coefficient of the
    second difference ``D2`` as ``(1 - e^{-2h} - 2h) / (2h)^2 - 0.5``, which tends to ``-1`` as ``h -> 0`` instead of
    to 0: sampled with the exact denoiser of a Gaussian data set, the sample standard deviation then converges to
    the wrong value (0.22-0.32 instead of 0.20 at 200-500 steps). The coefficient here is ``... + 0.5``, i.e.
    ``-phi_3(2h)`` with ``phi_3(z) = phi_2(z) / z - 1/2`` as in the ODE branch and in k-diffusion's
    ``sample_dpmpp_3m_sde`` (Lu et al. 2022b's 3M update with ``h`` doubled for the SDE). Every other branch is
    diffusers' own.
    """

    def multistep_dpm_solver_third_order_update(self, model_output_list: list[torch.Tensor], *args: Any,
                                                sample: torch.Tensor | None = None,
                                                noise: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if self.config.algorithm_type != "sde-dpmsolver++" or args or sample is None or noise is None:
            return super().multistep_dpm_solver_third_order_update(model_output_list, *args, sample=sample,
                                                                   noise=noise, **kwargs)
        i = self.step_index
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[i + 1])
        lambdas = []
        for j in (i, i - 1, i - 2):
            alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[j])
            lambdas.append(torch.log(alpha) - torch.log(sigma))
        _, sigma_s0 = self._sigma_to_alpha_sigma_t(self.sigmas[i])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lambda_t - lambdas[0], lambdas[0] - lambdas[1], lambdas[1] - lambdas[2]
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        decay = torch.exp(-2.0 * h)
        return ((sigma_t / sigma_s0 * torch.exp(-h)) * sample
                + (alpha_t * (1.0 - decay)) * m0
                + (alpha_t * ((1.0 - decay) / (-2.0 * h) + 1.0)) * d1
                + (alpha_t * ((1.0 - decay - 2.0 * h) / (2.0 * h) ** 2 + 0.5)) * d2
                + sigma_t * torch.sqrt(1.0 - decay) * noise)


_TRAILING = {"timestep_spacing": "trailing"}
_CLAMP_X0 = {"thresholding": True, "sample_max_value": 1.0}
_DPM = {**_TRAILING, "lambda_min_clipped": -5.1, **_CLAMP_X0}

#: name -> :class:`SamplerSpec`. The names are what ``sampler=`` accepts in ``model.sample``, ``sample.py``,
#: ``evaluate.py``, the sample-grid callback and ``scripts/fid_vs_nfe.py``.
SAMPLERS: dict[str, SamplerSpec] = {
    # ancestral sampling (Ho et al. 2020, Alg. 2); with fewer than T steps it is the strided ancestral sampler
    # whose per-step variance is 1 - ᾱ_t / ᾱ_prev (Nichol & Dhariwal 2021, Sec. 4)
    "ddpm": SamplerSpec(DDPMScheduler, {**_TRAILING}, 1, True, 1, "Ho et al. 2020, arXiv:2006.11239"),
    # DDIM (Song et al. 2021): deterministic at eta = 0 (the default), DDPM-like noise at eta = 1
    "ddim": SamplerSpec(DDIMScheduler, {**_TRAILING, "set_alpha_to_one": False}, 1, False, 1,
                        "Song et al. 2021, arXiv:2010.02502"),
    # DPM-Solver++(2M) and (3M), multistep ODE solvers in the data-prediction form (Lu et al. 2022b)
    "dpmpp": SamplerSpec(DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2, **_DPM},
                         2, False, 1, "Lu et al. 2022b, arXiv:2211.01095"),
    "dpmpp_3m": SamplerSpec(DPMSolverMultistepScheduler,
                            {"algorithm_type": "dpmsolver++", "solver_order": 3, **_DPM},
                            3, False, 1, "Lu et al. 2022b, arXiv:2211.01095"),
    # SDE-DPM-Solver++(2M) and (3M): the same multistep solvers for the reverse SDE (Lu et al. 2022b, App. B)
    "dpmpp_sde": SamplerSpec(DPMSolverMultistepScheduler,
                             {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, **_DPM},
                             2, True, 1, "Lu et al. 2022b, arXiv:2211.01095"),
    # (3M SDE: diffusers' third-order SDE step has a sign error, fixed in SDEDPMSolver3MScheduler)
    "dpmpp_3m_sde": SamplerSpec(SDEDPMSolver3MScheduler,
                                {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, **_DPM},
                                3, True, 1, "Lu et al. 2022b, arXiv:2211.01095"),
    # UniPC (Zhao et al. 2023): UniP-2 predictor + UniC corrector (order 3 in effect); bh2 as diffusers recommends
    # for few steps. No lambda_min_clipped in this scheduler.
    "unipc": SamplerSpec(UniPCMultistepScheduler, {"solver_order": 2, "solver_type": "bh2", **_TRAILING, **_CLAMP_X0},
                         2, False, 1, "Zhao et al. 2023, arXiv:2302.04867"),
    # Euler ancestral (Karras et al. 2022's Euler step on the probability-flow ODE in σ, plus ancestral noise,
    # as in k-diffusion); no thresholding option in this scheduler
    "euler_a": SamplerSpec(EulerAncestralDiscreteScheduler, {**_TRAILING}, 1, True, 1,
                           "Karras et al. 2022, arXiv:2206.00364 (k-diffusion's ancestral variant)"),
    # SA-Solver (Xue et al. 2023): stochastic Adams predictor-corrector, order 2 + 2 (the diffusers defaults, which
    # its docs advise for guided sampling); noise on the steps with 200 <= t <= 800 (diffusers' default tau)
    "sa_solver": SamplerSpec(SASolverScheduler, {"predictor_order": 2, "corrector_order": 2, **_DPM},
                             2, True, 1, "Xue et al. 2023, arXiv:2309.05019"),
}


def check_sampler(name: str) -> SamplerSpec:
    """The registry entry for ``name``.

    Raises:
        ValueError: if ``name`` is not a known sampler; the message lists the allowed names.
    """
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r} is not known; allowed values: {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def make_scheduler(name: str, train_config: dict[str, Any]) -> SchedulerMixin:
    """Build the sampling scheduler ``name`` with the training noise schedule ``train_config``.

    Args:
        name: one of :data:`SAMPLERS` (``ddpm``, ``ddim``, ``dpmpp``, ``dpmpp_3m``, ``dpmpp_sde``,
            ``dpmpp_3m_sde``, ``unipc``, ``euler_a``, ``sa_solver``).
        train_config: the training scheduler's config (``beta_schedule``, ``num_train_timesteps``,
            ``prediction_type``, ...), e.g. ``DDPMScheduler.config``.

    Raises:
        ValueError: if ``name`` is not a known sampler; the message lists the allowed names.
    """
    spec = check_sampler(name)
    # overrides as keyword arguments: a dict config would reset keys listed in its `_use_default_values`
    return spec.scheduler.from_config(train_config, **spec.overrides)


def expected_nfe(name: str, num_inference_steps: int) -> int:
    """Network evaluations that ``num_inference_steps`` steps of sampler ``name`` cost (per batch).

    Raises:
        ValueError: for an unknown sampler name (listing the allowed ones).
    """
    return check_sampler(name).nfe_per_step * int(num_inference_steps)


@functools.cache
def _step_parameters(cls: type[SchedulerMixin]) -> frozenset[str]:
    return frozenset(inspect.signature(cls.step).parameters)


def step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator | None = None,
                eta: float = 0.0) -> dict[str, Any]:
    """The extra keyword arguments for ``scheduler.step``: ``generator`` where ``step`` takes one (every stochastic
    scheduler here; UniPC's ``step`` takes none and draws no noise) and ``eta`` where it takes one (DDIM).

    The signature is inspected once per scheduler class.
    """
    accepted = _step_parameters(type(scheduler))
    kwargs: dict[str, Any] = {}
    if "generator" in accepted:
        kwargs["generator"] = generator
    if "eta" in accepted:
        kwargs["eta"] = float(eta)
    return kwargs
