"""The LoRA / DreamBooth training loss of :class:`atelier.models.sd_lora.StableDiffusionLoRA`: the noise-prediction
loss of latent diffusion (ε or v target, optionally min-SNR-γ weighted) with offset noise (Guttenberg 2023), and
the DreamBooth prior-preservation loss (Ruiz et al. 2023, Eq. 2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from atelier.models.ddpm import min_snr_weight

#: ``loss(latent moments (B, 2·C, h, w), hidden states (B, L, D)) -> per-image loss (B,)``
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def offset_noise(shape: Sequence[int], noise_offset: float = 0.0, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Training noise ``ε ~ N(0, I)`` of ``shape`` ``(B, C, h, w)`` plus, with ``noise_offset`` > 0, a per-image,
    per-channel constant ``noise_offset · N(0, 1)`` of shape ``(B, C, 1, 1)`` (Guttenberg 2023, "Diffusion with
    offset noise"): the model then also learns to shift an image's mean brightness, which plain ε-training barely
    does (very dark or bright images). The offset is drawn after ε, from the same ``generator``."""
    noise = randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=dtype)
    if noise_offset:
        offset = randn_tensor((shape[0], shape[1], 1, 1), generator=generator, device=torch.device(device),
                              dtype=dtype)
        noise = noise + noise_offset * offset
    return noise


def noise_prediction_loss(unet: torch.nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor,
                          hidden: torch.Tensor, noise_offset: float = 0.0, min_snr_gamma: float | None = None,
                          snr: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise-prediction loss per image ``(B,)`` float32 of a conditional UNet (diffusers' ``UNet2DConditionModel``)
    for scaled ``latents`` ``(B, C, h, w)`` and text ``hidden`` states ``(B, L, D)`` (in the UNet's device and
    dtype): noise (:func:`offset_noise` with ``noise_offset``) and uniform timesteps from ``generator``, the MSE to
    the ``scheduler``'s target (ε or v, its ``prediction_type``), with ``min_snr_gamma`` weighted by
    :func:`atelier.models.ddpm.min_snr_weight` of ``snr`` (per timestep, ``(T,)``, on the latents' device)."""
    noise = offset_noise(latents.shape, noise_offset, generator, latents.device, latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                      generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=hidden).sample
    kind = scheduler.config.prediction_type
    target = scheduler.get_velocity(latents, noise, t) if kind == "v_prediction" else noise
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma is not None:
        if snr is None:
            raise ValueError("noise_prediction_loss: min_snr_gamma needs the per-timestep snr")
        per_sample = per_sample * min_snr_weight(snr[t], min_snr_gamma, kind)
    return per_sample


def instance_and_class_loss(loss: PerSampleLoss, moments: torch.Tensor, hidden: torch.Tensor,
                            class_moments: torch.Tensor, class_hidden: torch.Tensor) -> torch.Tensor:
    """Per-image ``loss`` of the instance images followed by the DreamBooth class images ``(B + B_class,)``: one call
    on both when their latents have one shape, else one call each (the class images of a bucketed run are
    square)."""
    if class_moments.shape[1:] == moments.shape[1:]:
        return loss(torch.cat([moments, class_moments]), torch.cat([hidden, class_hidden]))
    return torch.cat([loss(moments, hidden), loss(class_moments, class_hidden)])


def prior_preservation_terms(instance: torch.Tensor, prior: torch.Tensor | None,
                             prior_loss_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The loss terms from per-image losses: ``instance_loss`` (mean of ``instance``) and ``loss``; with the
    DreamBooth class images' ``prior`` also ``prior_loss`` (its mean), and then
    ``loss = instance_loss + prior_loss_weight · prior_loss`` (Ruiz et al. 2023, Eq. 2)."""
    terms = {"instance_loss": instance.mean()}
    terms["loss"] = terms["instance_loss"]
    if prior is not None:
        terms["prior_loss"] = prior.mean()
        terms["loss"] = terms["loss"] + prior_loss_weight * terms["prior_loss"]
    return terms
