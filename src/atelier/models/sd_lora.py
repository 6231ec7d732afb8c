"""LoRA fine-tuning of Stable Diffusion (Hu et al. 2021) with an optional DreamBooth prior-preservation loss
(Ruiz et al. 2023), as a LightningModule.

Its helpers live beside it, by concept (their public names are importable from here too): the AdamW variant in
:mod:`atelier.models.adamw_variants`, the frozen parts' dtype in :mod:`atelier.text2image.frozen_precision`, the
loss (noise prediction, offset noise, DreamBooth prior preservation) in :mod:`atelier.models.lora_loss`, the
adapter's targets, size and saving in :mod:`atelier.text2image.lora_adapter`, sampling from the components and the
validation images in :mod:`atelier.text2image.lora_sampling`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from lightning import LightningModule
from PIL import Image

from atelier.data.captioned_batch import unpack_batch
from atelier.models.adamw_variants import OPTIMIZER_VARIANTS, adamw_variant, check_optimizer_variant
from atelier.models.lora_loss import (
    instance_and_class_loss,
    noise_prediction_loss,
    offset_noise,
    prior_preservation_terms,
)
from atelier.models.optim import OptimizerFactory, SchedulerFactory, optimizers_config
from atelier.text2image import lora_adapter
from atelier.text2image.frozen_precision import FROZEN_PRECISIONS, check_frozen_precision, frozen_dtype
from atelier.text2image.latent_cache import model_fingerprint
from atelier.text2image.lora_adapter import DEFAULT_TARGETS, add_unet_lora, lora_parameter_count, save_unet_lora
from atelier.text2image.lora_sampling import (
    component_pipeline,
    generate_images,
    save_validation_images,
    to_pil,
    to_uint8,
)
from atelier.text2image.schedulers import SD_SAMPLERS
from atelier.text2image.weights import is_random_weights, load_sd_pipeline, resolve_model
from atelier.utils.log_once import info_once

__all__ = ["DEFAULT_TARGETS", "FROZEN_PRECISIONS", "OPTIMIZER_VARIANTS", "StableDiffusionLoRA", "adamw_variant",
           "frozen_dtype", "lora_parameter_count", "offset_noise"]

log = logging.getLogger(__name__)

class StableDiffusionLoRA(LightningModule):
    """LoRA adapters on a frozen Stable Diffusion UNet, trained with the noise-prediction loss on captioned images.

    The VAE, text encoder and base UNet stay frozen (``requires_grad=False``, bit-identical after training); only
    the LoRA matrices ``A`` ``(rank, d_in)`` and ``B`` ``(d_out, rank)`` of the ``target_modules`` train, the
    adapted layer computing ``W x + (alpha / rank) · B A x`` (Hu et al. 2021, Eq. 3). Loss: the MSE between the
    UNet's prediction and its target (ε or v, the pipeline's ``prediction_type``) at a uniform random timestep
    (Ho et al. 2020, Eq. 14), optionally min-SNR-γ weighted (Hang et al. 2023). With DreamBooth class images in
    the batch the loss is ``L_instance + prior_loss_weight · L_prior`` (Ruiz et al. 2023, Eq. 2).

    Checkpoints hold only the LoRA parameters (``state_dict`` is filtered; loading is non-strict for the frozen
    weights, which come from ``pretrained_model``). At the end of training the adapter is written in diffusers'
    LoRA format to ``<trainer.default_root_dir>/lora/pytorch_lora_weights.safetensors``
    (``pipe.load_lora_weights`` reads it; ``generate.py lora=<that dir>``).

    Args:
        pretrained_model: hub id, local diffusers directory or ``tiny`` (see
            :func:`atelier.text2image.weights.resolve_model`); SD 1.x/2.x (``StableDiffusionPipeline``).
        optimizer: partial optimiser over the LoRA parameters (e.g. ``AdamW`` with ``lr``).
        lr_scheduler: optional partial, ``lr_scheduler(optimizer=..., num_training_steps=...)``.
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``.
        target_modules: module names (suffixes) in the UNet to adapt.
        lora_dropout: dropout on the LoRA branch input.
        min_snr_gamma: γ of min-SNR weighting (``atelier.models.ddpm.min_snr_weight``); ``None``: plain MSE.
        prior_loss_weight: weight λ of the DreamBooth prior-preservation loss (used when batches carry class images).
        validation_prompts: fixed prompts; at each validation, one image per prompt (seed = its index) is saved to
            ``samples/val_step_XXXXXXX.png`` and logged to W&B with its prompt, and ``val/clip_score`` is logged.
        num_inference_steps, guidance_scale, sampler: settings of those images and of :meth:`sample`.
        clip_model: CLIP model for ``val/clip_score`` (hub id or local dir; ``None``: the tiny model's ``clip/``
            for a tiny base, else no CLIP score).
        tiny_dir: where ``pretrained_model=tiny`` is built (``sd15_random`` beside it).
        gradient_checkpointing: recompute the UNet blocks' activations in the backward pass
            (``unet.enable_gradient_checkpointing()``, non-reentrant ``torch.utils.checkpoint``): same loss and
            gradients, a fraction of the activation memory, ~30 % more compute.
        frozen_precision: dtype of the frozen VAE and text encoder: ``auto`` (bf16 on CUDA and on CPUs with bf16
            matrix units, else fp32; decided at ``setup`` for the trainer's device, see :func:`frozen_dtype`),
            ``fp32`` or ``bf16``. The UNet keeps its dtype (its compute follows ``trainer.precision``).
        noise_offset: Guttenberg's offset noise (:func:`offset_noise`), e.g. 0.05-0.1; 0 turns it off.
        optimizer_variant: ``adamw``, ``fused``, ``8bit`` or ``auto`` (see :func:`adamw_variant`).

    With the datamodule's ``cache_latents`` the module encodes the dataset once at fit start (:meth:`on_fit_start`,
    :meth:`CaptionedFolderDataModule.prepare_cache`) and trains on the cached latent distributions (and text
    embeddings).

    Raises:
        ValueError: for ``rank < 1``, an unknown ``sampler``, ``frozen_precision`` or ``optimizer_variant``, a negative
            ``noise_offset``, an empty ``target_modules`` or a base model that is no ``StableDiffusionPipeline``
            (e.g. SDXL), each naming the key.
        MissingWeightsError: when the base weights are missing (naming id, local path, HF_HOME, HF_HUB_OFFLINE).
    """

    def __init__(
        self,
        pretrained_model: str,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        rank: int = 4,
        alpha: float = 4.0,
        target_modules: Sequence[str] = DEFAULT_TARGETS,
        lora_dropout: float = 0.0,
        min_snr_gamma: float | None = None,
        prior_loss_weight: float = 1.0,
        validation_prompts: Sequence[str] = (),
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        sampler: str = "dpmpp",
        clip_model: str | None = None,
        tiny_dir: str | None = None,
        gradient_checkpointing: bool = False,
        frozen_precision: str = "fp32",
        noise_offset: float = 0.0,
        optimizer_variant: str = "adamw",
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"model.rank must be >= 1, got {rank}")
        check_frozen_precision(frozen_precision)
        check_optimizer_variant(optimizer_variant)
        if noise_offset < 0:
            raise ValueError(f"model.noise_offset must be >= 0, got {noise_offset}")
        if sampler not in SD_SAMPLERS:
            raise ValueError(f"model.sampler={sampler!r} is not allowed; choose one of {sorted(SD_SAMPLERS)}")
        if not target_modules:
            raise ValueError("model.target_modules is empty; e.g. [to_q, to_k, to_v, to_out.0]")
        # plain lists (not Hydra ListConfigs) in hparams, so checkpoints load with weights_only=True
        target_modules, validation_prompts = [str(m) for m in target_modules], [str(p) for p in validation_prompts]
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"], logger=False)
        self.model_dir = resolve_model(pretrained_model, tiny_dir)
        index = json.loads((self.model_dir / "model_index.json").read_text())
        if index.get("_class_name") not in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"):
            raise ValueError(f"model.pretrained_model={pretrained_model}: LoRA training supports SD 1.x/2.x "
                             f"(StableDiffusionPipeline), not {index.get('_class_name')}")
        # an explicit bf16 loads the frozen parts in bf16 at once; `auto` is decided at setup for the trainer's device
        frozen = {"vae": torch.bfloat16, "text_encoder": torch.bfloat16} if frozen_precision == "bf16" else None
        pipe = load_sd_pipeline(self.model_dir, dtypes=frozen)
        self.vae, self.text_encoder, self.unet = pipe.vae, pipe.text_encoder, pipe.unet
        self.tokenizer = pipe.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for net in (self.vae, self.text_encoder, self.unet):
            net.requires_grad_(False)
        add_unet_lora(self.unet, rank, alpha, lora_dropout, target_modules)
        self.trainable_names = {n for n, p in self.named_parameters() if p.requires_grad}
        if not self.trainable_names:
            raise ValueError(f"model.target_modules={list(target_modules)} matched no UNet module")
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.random_weights = is_random_weights(self.model_dir)
        self.strict_loading = False  # checkpoints hold the LoRA parameters only
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.float()
        self.register_buffer("snr", alphas_cumprod / (1 - alphas_cumprod), persistent=False)
        self._clip: list[Any] = []  # lazily built CLIPScore, kept out of the module tree and the checkpoint

    # ---------------------------------------------------------------- parameters and checkpoints
    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable LoRA parameters (everything else is frozen)."""
        return [p for n, p in self.named_parameters() if n in self.trainable_names]

    def set_frozen_precision(self, device: torch.device | str) -> torch.dtype:
        """Convert the frozen VAE and text encoder to the dtype of ``frozen_precision`` on ``device``
        (:func:`frozen_dtype`); returns it. Logged once."""
        dtype = frozen_dtype(self.hparams.frozen_precision, torch.device(device))
        if self.vae.dtype != dtype or self.text_encoder.dtype != dtype:
            self.vae.to(dtype)
            self.text_encoder.to(dtype)
        info_once(log, "model.frozen_precision=%s: VAE and text encoder in %s on %s", self.hparams.frozen_precision,
                   str(dtype).removeprefix("torch."), torch.device(device).type)
        return dtype

    def cache_fingerprint(self) -> str:
        """The model part of latent/text cache keys (:func:`atelier.text2image.latent_cache.model_fingerprint`):
        the model directory, its encoders' weight files, their dtypes and the tokenizer length."""
        return model_fingerprint(self.model_dir, model_id=str(self.hparams.pretrained_model),
                                 vae_dtype=str(self.vae.dtype), text_dtype=str(self.text_encoder.dtype),
                                 max_length=int(self.tokenizer.model_max_length))

    def train(self, mode: bool = True) -> StableDiffusionLoRA:
        """Train mode for the UNet (LoRA dropout); the frozen VAE and text encoder always stay in eval mode."""
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The LoRA parameters only (the frozen base weights are reloaded from ``pretrained_model``)."""
        return lora_adapter.only_lora(super().state_dict(*args, **kwargs), self.trainable_names)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load LoRA parameters (a full state dict also works); with ``strict`` every LoRA parameter must be there.

        Raises:
            RuntimeError: under ``strict`` when LoRA parameters are missing (naming a few).
        """
        if strict:
            lora_adapter.check_lora_keys(state_dict, self.trainable_names, self.hparams.pretrained_model)
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # ---------------------------------------------------------------- training
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states ``(B, max_length, hidden)`` for ``prompts`` (padded/truncated), in the text
        encoder's dtype."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return self.text_encoder(ids.to(self.device))[0]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE's latent distributions ``(B, 2·C, H/8, W/8)`` (mean and log-variance moments, in the VAE's
        dtype) of ``images`` ``(B, 3, H, W)`` in ``[-1, 1]``; what the latent cache stores."""
        with torch.no_grad():
            return self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist.parameters

    def sample_latents(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents ``(B, C, h, w)`` float32: one draw ``mean + std · ε`` from the distributions ``moments``
        (computed in float32), times the VAE's ``scaling_factor``."""
        dist = DiagonalGaussianDistribution(moments.to(self.device, torch.float32))
        return dist.sample(generator=generator) * self.vae.config.scaling_factor

    def latent_loss(self, latents: torch.Tensor, hidden: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise-prediction loss per image ``(B,)`` float32 for scaled ``latents`` ``(B, C, h, w)`` and text
        ``hidden`` states ``(B, L, D)``: noise (with ``noise_offset``) and timesteps from ``generator``."""
        return noise_prediction_loss(self.unet, self.noise_scheduler, latents, hidden.to(self.device, self.unet.dtype),
                                     self.hparams.noise_offset, self.hparams.min_snr_gamma, self.snr, generator)

    def per_sample_loss(self, images: torch.Tensor, prompts: Sequence[str],
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise-prediction loss per image ``(B,)`` float32 for ``images`` ``(B, 3, H, W)`` in ``[-1, 1]``.

        ``generator`` (CPU) fixes the VAE sample, noise and timesteps (validation); ``None`` draws fresh ones.
        """
        moments = self.encode_images(images)
        return self.latent_loss(self.sample_latents(moments, generator), self.encode_prompts(prompts), generator)

    def _inputs(self, parts: Mapping[str, Any], prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """``(latent moments, hidden states)`` of the instance (``prefix=""``) or class (``"class_"``) part of an
        unpacked batch: cached when the batch carries them, else encoded now."""
        moments = parts.get(prefix + "latents")
        if moments is None:
            moments = self.encode_images(parts[prefix + "pixels"])
        hidden = parts.get(prefix + "text_embeddings")
        if hidden is None:
            hidden = self.encode_prompts(parts[prefix + "captions"])
        return moments.float(), hidden.to(self.device, self.unet.dtype)

    def loss_terms(self, batch: Any, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``loss`` (scalar to minimise), ``instance_loss`` and, for DreamBooth batches (with class images),
        ``prior_loss``, where ``loss = instance_loss + prior_loss_weight · prior_loss``.

        ``batch`` is a captioned tuple of images or a dict of cached latents
        (:func:`atelier.data.captioned_batch.unpack_batch`); instance and class images share one UNet call when
        their shapes match (the class images of a bucketed run are square: then two calls; see
        :mod:`atelier.models.lora_loss`)."""
        parts = unpack_batch(batch)
        moments, hidden = self._inputs(parts)
        b = moments.shape[0]

        def loss(m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            return self.latent_loss(self.sample_latents(m, generator), h, generator)

        if "class_captions" not in parts:
            return prior_preservation_terms(loss(moments, hidden)[:b], None)
        class_moments, class_hidden = self._inputs(parts, "class_")
        per_sample = instance_and_class_loss(loss, moments, hidden, class_moments, class_hidden)
        return prior_preservation_terms(per_sample[:b], per_sample[b:], self.hparams.prior_loss_weight)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch)
        b = len(unpack_batch(batch)["captions"])
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=b)
        if "prior_loss" in terms:
            self.log_dict({"train/instance_loss": terms["instance_loss"], "train/prior_loss": terms["prior_loss"]},
                          batch_size=b)
        return terms["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # fixed VAE sample, noise and timesteps per batch, so val/loss is comparable between evaluations
        loss = self.loss_terms(batch, torch.Generator().manual_seed(batch_idx))["instance_loss"]
        self.log("val/loss", loss, prog_bar=True, batch_size=len(unpack_batch(batch)["captions"]), sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        device = self.trainer.strategy.root_device
        factory = adamw_variant(self.optimizer_factory, self.hparams.optimizer_variant, device)
        return optimizers_config(self.trainer, self.lora_parameters(), factory, self.lr_scheduler_factory)

    def setup(self, stage: str) -> None:
        """Put the frozen VAE and text encoder in the dtype of ``frozen_precision`` for the trainer's device;
        DreamBooth: before fitting, have the datamodule generate (once) and cache its missing class images with
        the base model (LoRA is disabled while they are drawn)."""
        if self._trainer is not None:
            self.set_frozen_precision(self.trainer.strategy.root_device)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and getattr(datamodule, "prior_preservation", False):
            datamodule.ensure_class_images(self.generate_base)

    def on_fit_start(self) -> None:
        """With the datamodule's ``cache_latents``: encode the images (and captions) the run uses once, on the
        training device, before the loaders are built (:meth:`CaptionedFolderDataModule.prepare_cache`; under DDP
        the ranks share the work)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "cache_latents", False):
            datamodule.prepare_cache(self.encode_images, self.encode_prompts, self.cache_fingerprint(),
                                     rank=self.global_rank, world_size=self.trainer.world_size,
                                     barrier=self.trainer.strategy.barrier)

    # ---------------------------------------------------------------- sampling
    def pipeline(self) -> StableDiffusionPipeline:
        """A ``StableDiffusionPipeline`` over this module's components (LoRA active) with the configured sampler;
        no copy of the weights."""
        return component_pipeline(self.vae, self.text_encoder, self.tokenizer, self.unet, self.hparams.sampler,
                                  self.noise_scheduler.config)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """One image per prompt, image ``i`` from ``seeds[i]``: ``(N, 3, H, W)`` float32 in ``[-1, 1]`` (CPU).

        With the frozen parts in another dtype than the UNet (``frozen_precision``), the pipeline runs under
        autocast to the frozen dtype (that is what mixes them in training too)."""
        return generate_images(self.pipeline(), prompts, seeds, self.hparams.num_inference_steps,
                               self.hparams.guidance_scale, self.device.type)

    def generate_base(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        """Images of the base model (LoRA disabled) as PIL, for DreamBooth class images."""
        self.unet.disable_adapters()
        try:
            images = self.generate(prompts, seeds)
        finally:
            self.unet.enable_adapters()
        return to_pil(images)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images ``(n, 3, H, W)`` in ``[-1, 1]`` for the validation prompts (cycled; ``"a painting"`` when
        there are none), seeds drawn from ``generator`` (the sampling contract SampleGrid relies on)."""
        prompts = list(self.hparams.validation_prompts) or ["a painting"]
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=generator).tolist()
        return self.generate([prompts[i % len(prompts)] for i in range(n)], seeds)

    def on_validation_epoch_end(self) -> None:
        prompts = list(self.hparams.validation_prompts)
        if not prompts or self.trainer.sanity_checking:
            return
        images = self.generate(prompts, list(range(len(prompts))))
        step = self.global_step
        if self.trainer.is_global_zero:
            path = save_validation_images(self.trainer, images, prompts, step)
            log.info("validation images: %s", path)
        metric = self.clip_metric()
        if metric is not None:
            from atelier.text2image.clip_score import clip_scores

            score = clip_scores(metric, to_uint8(images), prompts).mean()
            metric.reset()
            self.log("val/clip_score", score, sync_dist=True)

    def clip_metric(self) -> Any:
        """The ``CLIPScore`` of ``clip_model`` (built once), or ``None`` when no CLIP model applies."""
        clip = self.hparams.clip_model
        if clip is None and self.random_weights:
            clip = str(self.model_dir / "clip")
        if clip is None:
            return None
        if not self._clip:
            from atelier.text2image.clip_score import make_clip_score

            self._clip.append(make_clip_score(clip))
        return self._clip[0].to(self.device)

    # ---------------------------------------------------------------- export
    def save_lora(self, path: str | Path) -> Path:
        """Write the UNet LoRA adapter in diffusers' format to ``path/pytorch_lora_weights.safetensors`` (with its
        rank/alpha metadata, readable by ``pipe.load_lora_weights(path)``) plus ``atelier_lora.json`` (base model,
        rank, alpha, targets); returns the file."""
        info = {"pretrained_model": self.hparams.pretrained_model, "model_dir": str(self.model_dir),
                "random_weights": self.random_weights, "rank": self.hparams.rank, "alpha": self.hparams.alpha,
                "target_modules": list(self.hparams.target_modules), "global_step": self.global_step if
                self._trainer is not None else None}
        return save_unet_lora(self.unet, path, info)

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            file = self.save_lora(Path(self.trainer.default_root_dir) / "lora")
            log.info("LoRA adapter saved to %s (generate.py model_id=%s lora=%s)", file,
                     self.hparams.pretrained_model, file.parent)
