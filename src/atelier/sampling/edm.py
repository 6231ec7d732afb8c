"""EDM: the preconditioning, training loss and samplers of Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models" (arXiv:2206.00364).

The network ``F`` is wrapped into a denoiser (Table 1, "Ours")::

    D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ))
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²),  c_noise = ¼ ln σ

and trained with ``ln σ ~ N(P_mean, P_std²)`` and the loss weight ``λ(σ) = 1 / c_out²`` (Eq. 8 and Sec. 5). The
samplers are diffusers' EDM schedulers (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``), whose
``scale_model_input`` applies ``c_in``, whose timesteps are ``c_noise`` and whose ``step`` applies ``c_skip`` /
``c_out`` (their ``prediction_type="epsilon"`` is this ``F``), plus Karras et al.'s own Heun sampler with churn
(Alg. 2), which diffusers has no scheduler for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from atelier.sampling.schedulers import SamplerSpec

#: ``predict(model_input, c_noise)``: the raw network output ``F`` ``(B, C, H, W)`` for the preconditioned input
#: ``c_in · x`` ``(B, C, H, W)`` at noise levels ``c_noise = ¼ ln σ`` ``(B,)`` float.
NetworkFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EDMConfig:
    """EDM's noise levels and training distribution (Karras et al. 2022, Table 1 and Sec. 5; their defaults).

    Attributes:
        sigma_data: σ_d, the data's standard deviation (0.5 for images in ``[-1, 1]``).
        sigma_min: smallest noise level of the sampling schedule.
        sigma_max: largest noise level, where sampling starts from ``N(0, σ_max² I)``.
        p_mean: mean of ``ln σ`` during training.
        p_std: standard deviation of ``ln σ`` during training.
        rho: ρ of the sampling schedule ``σ_i = (σ_max^{1/ρ} + i/(N-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ`` (Eq. 5).
    """

    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    p_mean: float = -1.2
    p_std: float = 1.2
    rho: float = 7.0

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"EDM needs 0 < model.sigma_min < model.sigma_max, got {self.sigma_min}, {self.sigma_max}")
        for key in ("sigma_data", "p_std", "rho"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be > 0, got {getattr(self, key)}")

    def scheduler_config(self) -> dict[str, Any]:
        """The config of the EDM schedulers (``EDMEulerScheduler(**config)``), with the Karras σ schedule."""
        cfg = asdict(self)
        del cfg["p_mean"], cfg["p_std"]
        return {**cfg, "sigma_schedule": "karras", "prediction_type": "epsilon"}


def preconditioning(sigma: torch.Tensor, sigma_data: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` at noise levels ``sigma`` (any shape, float, > 0), each of that shape
    (Karras et al. 2022, Table 1)."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt(), 0.25 * sigma.log()


def denoiser(predict: NetworkFn, sigma_data: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``D(x, σ)``: the denoised estimate ``(B, C, H, W)`` of ``x`` ``(B, C, H, W)`` at noise levels ``σ``
    ``(B,)`` float, from the network ``predict`` (Karras et al. 2022, Eq. 7)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = preconditioning(sigma.float(), sigma_data)
        view = (-1,) + (1,) * (x.ndim - 1)
        out = predict(c_in.view(view) * x, c_noise).float()
        return c_skip.view(view) * x + c_out.view(view) * out

    return denoise


def edm_loss(predict: NetworkFn, x0: torch.Tensor, config: EDMConfig,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM training loss of the network ``predict`` on clean images ``x0`` ``(B, C, H, W)`` in ``[-1, 1]``; a scalar.

    ``ln σ ~ N(P_mean, P_std²)`` per image, ``x = x0 + σ n``. ``λ(σ) ‖D(x; σ) − x0‖²`` with ``λ = 1 / c_out²``
    (Karras et al. 2022, Eq. 2 and 8) equals the plain MSE between ``F`` and its effective target
    ``(x0 − c_skip x) / c_out`` (Eq. 8 rewritten), which is what is computed: unit weight at every σ.
    ``generator`` fixes σ and the noise (validation).
    """
    b = x0.shape[0]
    view = (b,) + (1,) * (x0.ndim - 1)
    normal = randn_tensor((b,), generator=generator, device=x0.device, dtype=torch.float32)
    sigma = (config.p_mean + config.p_std * normal).exp()
    noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, config.sigma_data)
    x = x0 + sigma.view(view) * noise
    target = (x0.float() - c_skip.view(view) * x.float()) / c_out.view(view)
    out = predict(c_in.view(view) * x, c_noise)
    return F.mse_loss(out.float(), target)


def heun_sample(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    generator: torch.Generator | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Karras et al. 2022's stochastic sampler (Alg. 2): Heun steps on the probability-flow ODE, each first raising
    σ_i to ``σ̂ = (1 + γ) σ_i`` with fresh noise (churn), ``γ = min(S_churn / N, √2 − 1)`` for σ_i in
    ``[S_tmin, S_tmax]``; ``S_churn = 0`` is the deterministic Alg. 1. NFE: ``2N − 1`` (the last step, to σ = 0,
    is an Euler step).

    Args:
        denoise: ``D(x, σ)`` (:func:`denoiser`), ``x`` ``(B, C, H, W)``, ``σ`` ``(B,)`` float.
        noise: ``(B, C, H, W)`` standard normal noise; sampling starts at ``σ_0 · noise``.
        sigmas: ``(N + 1,)`` decreasing noise levels ending with 0 (``EDMEulerScheduler.sigmas``).
        generator: CPU generator for the churn noise.
        s_churn, s_tmin, s_tmax, s_noise: Alg. 2's ``S_churn``, ``S_tmin``, ``S_tmax``, ``S_noise``.

    Returns:
        ``(B, C, H, W)`` float32, unclamped (about ``[-1, 1]``).
    """
    sigmas = sigmas.float().tolist()
    steps = len(sigmas) - 1
    b = noise.shape[0]
    x = noise.float() * sigmas[0]
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            eps = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * eps
        d = (x - denoise(x, x.new_full((b,), sigma_hat))) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next > 0:  # second-order correction
            d_next = (x_next - denoise(x_next, x.new_full((b,), sigma_next))) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        x = x_next
    return x


_CLAMP_X0 = {"thresholding": True, "sample_max_value": 1.0}

#: name -> :class:`~atelier.sampling.schedulers.SamplerSpec` for ``model.parameterization=edm``. ``edm_heun`` runs
#: :func:`heun_sample` on the σ of ``EDMEulerScheduler`` (its ``nfe_per_step`` 2; the last step costs 1).
EDM_SAMPLERS: dict[str, SamplerSpec] = {
    "edm_euler": SamplerSpec(EDMEulerScheduler, {}, 1, False, 1,
                             "Karras et al. 2022, arXiv:2206.00364 (Alg. 1 with Euler steps)"),
    "edm_heun": SamplerSpec(EDMEulerScheduler, {}, 2, True, 2,
                            "Karras et al. 2022, arXiv:2206.00364 (Alg. 2, stochastic only with s_churn > 0)"),
    "edm_dpmpp": SamplerSpec(EDMDPMSolverMultistepScheduler,
                             {"algorithm_type": "dpmsolver++", "solver_order": 2, **_CLAMP_X0},
                             2, False, 1, "Lu et al. 2022b, arXiv:2211.01095 on Karras et al.'s σ"),
    "edm_dpmpp_sde": SamplerSpec(EDMDPMSolverMultistepScheduler,
                                 {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, **_CLAMP_X0},
                                 2, True, 1, "Lu et al. 2022b, arXiv:2211.01095 on Karras et al.'s σ"),
}


def make_edm_scheduler(name: str, config: EDMConfig) -> SchedulerMixin:
    """The diffusers EDM scheduler of sampler ``name`` for ``config``'s σ range and σ_d.

    Raises:
        ValueError: if ``name`` is not in :data:`EDM_SAMPLERS`; the message lists the allowed names.
    """
    if name not in EDM_SAMPLERS:
        raise ValueError(f"sampler={name!r} is not an EDM sampler; allowed values: {sorted(EDM_SAMPLERS)}")
    spec = EDM_SAMPLERS[name]
    return spec.scheduler(**config.scheduler_config(), **spec.overrides)


def edm_expected_nfe(name: str, num_inference_steps: int) -> int:
    """Network evaluations of ``num_inference_steps`` steps of EDM sampler ``name`` (per batch)."""
    if name == "edm_heun":
        return 2 * num_inference_steps - 1
    return int(num_inference_steps)
