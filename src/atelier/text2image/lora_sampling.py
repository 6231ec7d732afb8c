"""Images from the components of a Stable Diffusion training module
(:class:`atelier.models.sd_lora.StableDiffusionLoRA`): a pipeline over them without copying weights, generation with
the frozen parts in another dtype than the UNet, the image conversions, and the validation images (PNG grid under
``samples/``, W&B)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from atelier.callbacks.samples import save_grid
from atelier.text2image.schedulers import make_sd_scheduler


def component_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, sampler: str,
                       scheduler_config: Any) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` over these components (no copy of the weights; no safety checker, no progress
    bar) with the ``sampler`` (:func:`atelier.text2image.schedulers.make_sd_scheduler` of ``scheduler_config``)."""
    scheduler = make_sd_scheduler(sampler, scheduler_config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_images(pipe: StableDiffusionPipeline, prompts: Sequence[str], seeds: Sequence[int],
                    num_inference_steps: int, guidance_scale: float, device_type: str) -> torch.Tensor:
    """One image per prompt, image ``i`` from ``seeds[i]``: ``(N, 3, H, W)`` float32 in ``[-1, 1]`` (CPU).

    The UNet is in eval mode meanwhile (its mode is restored after). With the VAE in another dtype than the UNet,
    the pipeline runs under autocast (on ``device_type``) to the VAE's dtype."""
    unet, vae = pipe.unet, pipe.vae
    was_training = unet.training
    unet.eval()
    mixed = vae.dtype != unet.dtype
    try:
        with torch.autocast(device_type, dtype=vae.dtype, enabled=mixed):
            out = pipe(list(prompts), num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, output_type="pt",
                       generator=[torch.Generator().manual_seed(int(s)) for s in seeds]).images
    finally:
        unet.train(was_training)
    return out.float().cpu() * 2 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` as uint8 ``[0, 255]`` (rounded, clamped), same shape."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images ``(N, 3, H, W)`` in ``[-1, 1]`` as RGB PIL images."""
    return [Image.fromarray(to_uint8(x).permute(1, 2, 0).numpy()) for x in images]


def save_validation_images(trainer: Any, images: torch.Tensor, prompts: Sequence[str], step: int) -> Path:
    """Save ``images`` (one per prompt, in ``[-1, 1]``) as ``<default_root_dir>/samples/val_step_XXXXXXX.png`` and
    log them to every W&B logger as ``val/images`` with their prompts; returns the PNG."""
    path = save_grid(images, Path(trainer.default_root_dir) / "samples" / f"val_step_{step:07d}.png")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key="val/images", images=[(x + 1) / 2 for x in images], caption=list(prompts),
                             step=step)
    return path
