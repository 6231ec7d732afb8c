"""LoRA fine-tuning of Stable Diffusion (Hu et al. 2021) with an optional DreamBooth prior-preservation loss
(Ruiz et al. 2023), as a LightningModule."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.torch_utils import randn_tensor
from lightning import LightningModule
from lightning.pytorch.loggers import WandbLogger
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from atelier.callbacks.samples import save_grid
from atelier.data.captioned_folder import collate_check
from atelier.models.ddpm import min_snr_weight
from atelier.models.optim import OptimizerFactory, SchedulerFactory, optimizers_config
from atelier.text2image.pipeline import LORA_WEIGHTS
from atelier.text2image.schedulers import SD_SAMPLERS, make_sd_scheduler
from atelier.text2image.tiny import is_tiny
from atelier.text2image.weights import resolve_model

log = logging.getLogger(__name__)

#: the UNet attention projections LoRA adapts by default (query, key, value, output of every attention)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


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
        tiny_dir: where ``pretrained_model=tiny`` is built.

    Raises:
        ValueError: for ``rank < 1``, an unknown ``sampler``, an empty ``target_modules`` or a base model that is no
            ``StableDiffusionPipeline`` (e.g. SDXL), each naming the key.
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
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"model.rank must be >= 1, got {rank}")
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
        pipe = StableDiffusionPipeline.from_pretrained(str(self.model_dir), safety_checker=None,
                                                       requires_safety_checker=False)
        self.vae, self.text_encoder, self.unet = pipe.vae, pipe.text_encoder, pipe.unet
        self.tokenizer = pipe.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for net in (self.vae, self.text_encoder, self.unet):
            net.requires_grad_(False)
        try:
            self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=lora_dropout,
                                             init_lora_weights="gaussian", target_modules=target_modules))
        except ValueError as err:
            raise ValueError(f"model.target_modules={target_modules}: {err}") from err
        self.trainable_names = {n for n, p in self.named_parameters() if p.requires_grad}
        if not self.trainable_names:
            raise ValueError(f"model.target_modules={list(target_modules)} matched no UNet module")
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.random_weights = is_tiny(self.model_dir)
        self.strict_loading = False  # checkpoints hold the LoRA parameters only
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.float()
        self.register_buffer("snr", alphas_cumprod / (1 - alphas_cumprod), persistent=False)
        self._clip: list[Any] = []  # lazily built CLIPScore, kept out of the module tree and the checkpoint

    # ---------------------------------------------------------------- parameters and checkpoints
    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable LoRA parameters (everything else is frozen)."""
        return [p for n, p in self.named_parameters() if n in self.trainable_names]

    def train(self, mode: bool = True) -> StableDiffusionLoRA:
        """Train mode for the UNet (LoRA dropout); the frozen VAE and text encoder always stay in eval mode."""
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The LoRA parameters only (the frozen base weights are reloaded from ``pretrained_model``)."""
        full = super().state_dict(*args, **kwargs)
        return OrderedDict((k, v) for k, v in full.items() if k in self.trainable_names)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load LoRA parameters (a full state dict also works); with ``strict`` every LoRA parameter must be there.

        Raises:
            RuntimeError: under ``strict`` when LoRA parameters are missing (naming a few).
        """
        missing = sorted(self.trainable_names - set(state_dict))
        if strict and missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} LoRA parameters, e.g. {missing[:3]}; was it "
                               f"trained with the same rank/target_modules on {self.hparams.pretrained_model}?")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # ---------------------------------------------------------------- training
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states ``(B, max_length, hidden)`` for ``prompts`` (padded/truncated)."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def per_sample_loss(self, images: torch.Tensor, prompts: Sequence[str],
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise-prediction loss per image ``(B,)`` float32 for ``images`` ``(B, 3, H, W)`` in ``[-1, 1]``.

        ``generator`` (CPU) fixes the VAE sample, noise and timesteps (validation); ``None`` draws fresh ones.
        """
        with torch.no_grad():
            dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
            latents = dist.sample(generator=generator) * self.vae.config.scaling_factor
            hidden = self.encode_prompts(prompts)
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                          generator=generator).to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=hidden).sample
        kind = self.noise_scheduler.config.prediction_type
        target = self.noise_scheduler.get_velocity(latents, noise, t) if kind == "v_prediction" else noise
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.hparams.min_snr_gamma is not None:
            per_sample = per_sample * min_snr_weight(self.snr[t], self.hparams.min_snr_gamma, kind)
        return per_sample

    def loss_terms(self, batch: Any, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``loss`` (scalar to minimise), ``instance_loss`` and, for DreamBooth batches (with class images),
        ``prior_loss``, where ``loss = instance_loss + prior_loss_weight · prior_loss``."""
        images, captions = collate_check(batch)
        b = images.shape[0]
        if len(batch) == 4:
            images = torch.cat([images, batch[2]])
            captions = captions + list(batch[3])
        per_sample = self.per_sample_loss(images, captions, generator)
        terms = {"instance_loss": per_sample[:b].mean()}
        terms["loss"] = terms["instance_loss"]
        if len(batch) == 4:
            terms["prior_loss"] = per_sample[b:].mean()
            terms["loss"] = terms["loss"] + self.hparams.prior_loss_weight * terms["prior_loss"]
        return terms

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch)
        b = batch[0].shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=b)
        if "prior_loss" in terms:
            self.log_dict({"train/instance_loss": terms["instance_loss"], "train/prior_loss": terms["prior_loss"]},
                          batch_size=b)
        return terms["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # fixed VAE sample, noise and timesteps per batch, so val/loss is comparable between evaluations
        images, captions = collate_check(batch)
        loss = self.per_sample_loss(images, captions, torch.Generator().manual_seed(batch_idx)).mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=images.shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        return optimizers_config(self.trainer, self.lora_parameters(), self.optimizer_factory,
                                 self.lr_scheduler_factory)

    def setup(self, stage: str) -> None:
        """DreamBooth: before fitting, have the datamodule generate (once) and cache its missing class images with
        the base model (LoRA is disabled while they are drawn)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and getattr(datamodule, "prior_preservation", False):
            datamodule.ensure_class_images(self.generate_base)

    # ---------------------------------------------------------------- sampling
    def pipeline(self) -> StableDiffusionPipeline:
        """A ``StableDiffusionPipeline`` over this module's components (LoRA active) with the configured sampler;
        no copy of the weights."""
        scheduler = make_sd_scheduler(self.hparams.sampler, self.noise_scheduler.config)
        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """One image per prompt, image ``i`` from ``seeds[i]``: ``(N, 3, H, W)`` float32 in ``[-1, 1]`` (CPU)."""
        was_training = self.unet.training
        self.unet.eval()
        try:
            out = self.pipeline()(list(prompts), num_inference_steps=self.hparams.num_inference_steps,
                                  guidance_scale=self.hparams.guidance_scale, output_type="pt",
                                  generator=[torch.Generator().manual_seed(int(s)) for s in seeds]).images
        finally:
            self.unet.train(was_training)
        return out.float().cpu() * 2 - 1

    def generate_base(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        """Images of the base model (LoRA disabled) as PIL, for DreamBooth class images."""
        self.unet.disable_adapters()
        try:
            images = self.generate(prompts, seeds)
        finally:
            self.unet.enable_adapters()
        return [Image.fromarray(((x + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
                for x in images]

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
            path = save_grid(images, Path(self.trainer.default_root_dir) / "samples" / f"val_step_{step:07d}.png")
            for logger in self.trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key="val/images", images=[(x + 1) / 2 for x in images], caption=prompts,
                                     step=step)
            log.info("validation images: %s", path)
        metric = self.clip_metric()
        if metric is not None:
            from atelier.text2image.clip_score import clip_scores

            uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            score = clip_scores(metric, uint8, prompts).mean()
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
        path = Path(path)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        config = self.unet.peft_config["default"].to_dict()
        metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        StableDiffusionPipeline.save_lora_weights(save_directory=str(path), unet_lora_layers=layers,
                                                  safe_serialization=True, unet_lora_adapter_metadata=metadata)
        info = {"pretrained_model": self.hparams.pretrained_model, "model_dir": str(self.model_dir),
                "random_weights": self.random_weights, "rank": self.hparams.rank, "alpha": self.hparams.alpha,
                "target_modules": list(self.hparams.target_modules), "global_step": self.global_step if
                self._trainer is not None else None}
        (path / "atelier_lora.json").write_text(json.dumps(info, indent=2))
        return path / LORA_WEIGHTS

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            file = self.save_lora(Path(self.trainer.default_root_dir) / "lora")
            log.info("LoRA adapter saved to %s (generate.py model_id=%s lora=%s)", file,
                     self.hparams.pretrained_model, file.parent)
