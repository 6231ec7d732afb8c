"""Denoising diffusion probabilistic model (Ho et al. 2020) as a LightningModule, optionally with EDM's
preconditioning and loss (Karras et al. 2022; :mod:`atelier.sampling.edm`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, EDMEulerScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from lightning import LightningModule
from torch import nn

from atelier.models.ddpm_sampling import draw
from atelier.models.ema import make_ema
from atelier.models.optim import OptimizerFactory, SchedulerFactory, optimizers_config
from atelier.sampling.edm import EDM_SAMPLERS, EDMConfig, edm_loss
from atelier.sampling.guidance import drop_labels
from atelier.sampling.schedulers import SAMPLERS
from atelier.utils.compile import missing_cpu_compiler

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
PARAMETERIZATIONS = ("ddpm", "edm")

log = logging.getLogger(__name__)


def _check_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"model.{key}={value!r} is not allowed; choose one of {list(allowed)}")


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023, Eq. 5 and its ε-/v-forms).

    The x0-loss weight is ``min(SNR, γ)``; expressed for the MSE on the network's own target it becomes
    ``min(SNR, γ) / SNR`` for ε-prediction and ``min(SNR, γ) / (SNR + 1)`` for v-prediction.

    Args:
        snr: ``(B,)`` float, signal-to-noise ratio ``ᾱ_t / (1 - ᾱ_t)`` of each sample's timestep.
        gamma: the clamp γ (the paper uses 5).
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
    """
    clamped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clamped / snr
    if prediction_type == "v_prediction":
        return clamped / (snr + 1)
    return clamped


class DDPM(LightningModule):
    """DDPM training (simple loss, Ho et al. 2020 Eq. 14) with EMA weights and diffusers samplers; optionally
    class-conditional with classifier-free guidance (Ho & Salimans 2022).

    Args:
        net: noise-prediction network, called as ``net(x_t, t).sample`` with ``x_t`` ``(B, C, H, W)`` float in
            about ``[-1, 1]`` and ``t`` ``(B,)`` int64 (plus ``class_labels=`` ``(B,)`` int64 when conditional);
            typically a diffusers ``UNet2DModel`` from :func:`atelier.nets.unet.build_unet`.
        optimizer: partial optimiser, called with the network's parameters (e.g. ``AdamW`` with ``lr``).
        lr_scheduler: optional partial, called as ``lr_scheduler(optimizer=..., num_training_steps=...)``, e.g.
            ``diffusers.optimization.get_scheduler`` with ``name`` and ``num_warmup_steps``; stepped per step.
        num_train_timesteps: diffusion steps T.
        beta_schedule: ``linear`` (Ho et al.), ``scaled_linear`` or ``squaredcos_cap_v2`` (cosine, Nichol &
            Dhariwal 2021).
        prediction_type: ``epsilon`` (ε-prediction), ``v_prediction`` (Salimans & Ho 2022) or ``sample`` (x0).
        min_snr_gamma: γ of min-SNR loss weighting (Hang et al. 2023); ``None`` for the plain MSE.
        ema_decay: maximum EMA decay; ``ema_warmup`` ramps it as ``(1 + n) / (10 + n)``.
        ema_warmup: whether to warm the EMA decay up.
        sampler: default sampler name for :meth:`sample`, one of
            :data:`atelier.sampling.schedulers.SAMPLERS` (``ddpm``, ``ddim``, ``dpmpp``, ``dpmpp_3m``,
            ``dpmpp_sde``, ``dpmpp_3m_sde``, ``unipc``, ``euler_a``, ``sa_solver``; ``docs/samplers.md``).
        num_inference_steps: default number of sampler steps (= NFE for every sampler).
        num_classes: classes of a class-conditional model (``None``: unconditional). The network must embed
            ``num_classes + 1`` labels, the last being the null class; batches must be ``(images, labels)``.
        cond_drop_prob: probability of replacing a training label by the null class, which trains the
            unconditional prediction that classifier-free guidance needs (Ho & Salimans 2022 use 0.1–0.2).
        guidance_scale: default guidance scale ``w`` for :meth:`sample` (1: plain conditional).
        parameterization: ``ddpm`` (the discrete-time schedule above) or ``edm``: Karras et al. 2022's
            preconditioning ``c_skip, c_out, c_in, c_noise``, log-normal σ with ``edm_p_mean``/``edm_p_std`` and
            unit-weight loss (:func:`atelier.sampling.edm.edm_loss`), sampled by
            :data:`atelier.sampling.edm.EDM_SAMPLERS` (``edm_euler``, ``edm_heun``, ``edm_dpmpp``,
            ``edm_dpmpp_sde``). With ``edm``, ``num_train_timesteps``, ``beta_schedule`` and ``prediction_type``
            are unused and the network's timestep input is ``c_noise = ¼ ln σ`` (float).
        sigma_data, sigma_min, sigma_max, edm_p_mean, edm_p_std: EDM's σ_d, σ range and training ``ln σ``
            distribution (:class:`atelier.sampling.edm.EDMConfig`); unused with ``ddpm``.
        s_churn: EDM's ``S_churn`` for the ``edm_heun`` sampler (0: deterministic Heun).
        compile: compile the training network with ``torch.compile`` (``nn.Module.compile``, in place, so the
            ``state_dict`` keys and checkpoints are unchanged) when Lightning calls :meth:`configure_model`. The
            EMA copy that samples stays eager, and so does validation (the network's forward called directly).
            The first steps pay the compile time; measure the gain with ``scripts/bench_train.py --compile`` on
            the machine at hand. Without a C++ compiler (CPU) the network stays eager, with a warning.

    Raises:
        ValueError: for a ``beta_schedule``, ``prediction_type`` or ``sampler`` outside the allowed values, a
            ``cond_drop_prob`` outside ``[0, 1)``, or a network whose class embedding does not match
            ``num_classes``; an EDM sampler with ``parameterization=ddpm`` or the reverse; ``min_snr_gamma`` with
            ``edm``.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        prediction_type: str = "epsilon",
        min_snr_gamma: float | None = None,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        sampler: str = "ddim",
        num_inference_steps: int = 50,
        num_classes: int | None = None,
        cond_drop_prob: float = 0.1,
        guidance_scale: float = 1.0,
        parameterization: str = "ddpm",
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        edm_p_mean: float = -1.2,
        edm_p_std: float = 1.2,
        s_churn: float = 0.0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("sampler", sampler, EDM_SAMPLERS if parameterization == "edm" else SAMPLERS)
        if parameterization == "edm" and min_snr_gamma is not None:
            raise ValueError("model.min_snr_gamma weights the discrete-time loss; EDM has its own weighting "
                             "(model.parameterization=edm): set model.min_snr_gamma=null")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"model.min_snr_gamma must be > 0 or null, got {min_snr_gamma}")
        if not 0 <= cond_drop_prob < 1:
            raise ValueError(f"model.cond_drop_prob={cond_drop_prob} must be in [0, 1)")
        embeds = getattr(getattr(net, "config", None), "num_class_embeds", None)
        expected = None if num_classes is None else int(num_classes) + 1
        if embeds != expected:
            raise ValueError(
                f"model.num_classes={num_classes} needs a network with num_class_embeds={expected} (the classes plus "
                f"the null class), but model.net has {embeds}; set model.net.num_classes=${{model.num_classes}}")
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"], logger=False)
        self.net = net
        self.ema = make_ema(net, ema_decay, ema_warmup)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.edm: EDMConfig | None = None
        self.noise_scheduler: DDPMScheduler | EDMEulerScheduler
        if parameterization == "edm":
            self.edm = EDMConfig(sigma_data, sigma_min, sigma_max, edm_p_mean, edm_p_std)
            self.noise_scheduler = EDMEulerScheduler(**self.edm.scheduler_config())
            self.register_buffer("snr", torch.empty(0), persistent=False)
            return
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
        )
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.float()
        self.register_buffer("snr", alphas_cumprod / (1 - alphas_cumprod), persistent=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images this model generates."""
        cfg = self.net.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    @property
    def num_classes(self) -> int | None:
        """Number of classes of a conditional model (the null class is index ``num_classes``), else ``None``."""
        return self.hparams.get("num_classes")

    def predict(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """The network's prediction ``(B, C, H, W)`` at ``(x, t)``, conditioned on ``labels`` ``(B,)`` if given."""
        if labels is None:
            return net(x, t).sample
        return net(x, t, class_labels=labels).sample

    def configure_model(self) -> None:
        """Compile the training network in place when ``compile=True`` (once; Lightning calls this per stage).

        Without a C++ compiler (which TorchInductor needs on the CPU) the network stays eager, with one warning.
        """
        if not self.hparams.get("compile", False) or getattr(self.net, "_compiled_call_impl", None) is not None:
            return
        # Lightning calls this before moving the module to its device, and Triton (GPU) needs a C compiler too
        missing = missing_cpu_compiler()
        if missing:
            log.warning("model.compile=true but %s; training the network eagerly (model.compile=false "
                        "silences this)", missing)
            return
        self.net.compile()

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if self.num_classes is not None and data_classes is not None and int(data_classes) != self.num_classes:
            raise ValueError(f"model.num_classes={self.num_classes} but the datamodule has {data_classes} classes; "
                             f"set model.num_classes={data_classes}")

    # ----------------------------------------------------------------- training
    def diffusion_loss(self, x0: torch.Tensor, generator: torch.Generator | None = None,
                       labels: torch.Tensor | None = None, net: Callable[..., Any] | None = None) -> torch.Tensor:
        """Per-batch diffusion loss for clean images ``x0`` ``(B, C, H, W)`` in ``[-1, 1]``; returns a scalar.

        ``labels`` ``(B,)`` int64 (conditional models; already label-dropped) condition the prediction. ``net``
        (default: the training network) is what predicts; validation passes the eager forward of a compiled
        network. With ``parameterization=edm`` this is :func:`atelier.sampling.edm.edm_loss`.
        """
        net = self.net if net is None else net
        if self.edm is not None:
            return edm_loss(lambda x, c_noise: self.predict(net, x, c_noise, labels), x0, self.edm, generator)
        b = x0.shape[0]
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = torch.randint(0, self.hparams.num_train_timesteps, (b,), device="cpu", generator=generator)
        t = t.to(x0.device)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        pred = self.predict(net, x_t, t, labels)
        kind = self.hparams.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = x0
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.hparams.min_snr_gamma is not None:
            per_sample = per_sample * min_snr_weight(self.snr[t], self.hparams.min_snr_gamma, kind)
        return per_sample.mean()

    def _batch(self, batch: Any, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images and, for conditional models, labels with classifier-free dropout applied."""
        x0 = _images(batch)
        if self.num_classes is None:
            return x0, None
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise ValueError("a class-conditional DDPM (model.num_classes set) needs (images, labels) batches")
        labels = batch[1].long()
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}); "
                             f"got {int(labels.min())}..{int(labels.max())}")
        return x0, drop_labels(labels, self.num_classes, self.hparams.cond_drop_prob, generator)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x0, labels = self._batch(batch)
        loss = self.diffusion_loss(x0, labels=labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.ema.update_parameters(self.net)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # Fixed noise and timesteps per batch, so val/loss is comparable between evaluations.
        generator = torch.Generator().manual_seed(batch_idx)
        x0, labels = self._batch(batch, generator)
        # A compiled network's forward called directly runs eagerly: validation's no-grad eval mode would otherwise
        # recompile the graph (~25 s on a 2-core CPU) for 8 batches every 500 steps.
        loss = self.diffusion_loss(x0, generator, labels, net=self.net.forward)
        self.log("val/loss", loss, prog_bar=True, batch_size=x0.shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        return optimizers_config(self.trainer, self.net.parameters(), self.optimizer_factory, self.lr_scheduler_factory)

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        num_inference_steps: int | None = None,
        eta: float = 0.0,
        batch_size: int = 256,
        use_ema: bool = True,
        labels: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        autocast: bool = False,
        guide: nn.Module | None = None,
        autoguidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Draw ``n`` images by reverse diffusion, with classifier-free guidance for conditional models.

        Args:
            n: number of images.
            generator: CPU ``torch.Generator`` for the initial noise and for every stochastic sampler's noise
                (ancestral, SDE); same seed, same images.
            sampler: a name of :data:`atelier.sampling.schedulers.SAMPLERS` (``ddpm``, ``ddim``, ``dpmpp``,
                ``dpmpp_3m``, ``dpmpp_sde``, ``dpmpp_3m_sde``, ``unipc``, ``euler_a``, ``sa_solver``), or with
                ``parameterization=edm`` of :data:`atelier.sampling.edm.EDM_SAMPLERS`; defaults to
                ``hparams.sampler``.
            num_inference_steps: sampler steps (= NFE for every sampler but ``edm_heun``: 2N − 1); defaults to
                ``hparams.num_inference_steps``. ``ddpm`` with fewer than ``num_train_timesteps`` steps is strided
                ancestral sampling.
            eta: DDIM stochasticity (0 = deterministic); ignored by other samplers.
            batch_size: images per network call.
            use_ema: sample with the EMA weights (default) or the raw training weights.
            labels: ``(n,)`` int64 classes of a conditional model; default: ``ceil(n / num_classes)`` consecutive
                images per class (:func:`atelier.sampling.guidance.rows_per_class`).
            guidance_scale: classifier-free guidance scale ``w`` (0: unconditional, 1: conditional); defaults to
                ``hparams.guidance_scale``. With ``w ∉ {0, 1}`` each step evaluates the network on ``2B`` images.
            autocast: run the network under bf16 autocast where that pays (a CPU with bf16 matrix units, a GPU with
                bf16; :func:`atelier.sampling.loop.sampling_autocast_dtype`); default fp32.
            guide: a weaker network of the same architecture for autoguidance (Karras et al. 2024), e.g. the EMA
                network of an earlier checkpoint of the same run (``guide_ckpt_path``:
                :func:`atelier.tasks.sample.guide_kwargs`); it runs in eval mode and doubles the network calls.
            autoguidance_scale: autoguidance weight ``w`` (1: the main network alone). Applied on top of
                classifier-free guidance for conditional models.
            guidance_interval: ``(σ_lo, σ_hi)``: apply both guidances only at steps whose noise level σ lies in
                ``(σ_lo, σ_hi]`` and sample with the plain (conditional / main) network elsewhere, which also skips
                the guide's and the unconditional pass there (Kynkäänniemi et al. 2024, "Applying Guidance in a
                Limited Interval", arXiv:2404.07724; σ = √((1 − ᾱ_t) / ᾱ_t) for the VP schedules, EDM's σ
                itself). ``None`` (default): guide at every step.

        Returns:
            ``(n, C, H, W)`` float32 tensor in ``[-1, 1]`` on this module's device.

        Raises:
            ValueError: for ``n`` or ``num_inference_steps`` < 1, an unknown sampler (the message lists the allowed
                names), ``labels`` or a guidance scale other than 1 for an unconditional model, labels of the wrong
                length or range, an ``autoguidance_scale`` other than 1 without a ``guide``, or a
                ``guidance_interval`` that is not two noise levels ``0 ≤ σ_lo < σ_hi``.
        """
        return draw(self, n, generator, sampler, num_inference_steps, eta, batch_size, use_ema, labels,
                    guidance_scale, autocast, guide, autoguidance_scale, guidance_interval)

    def save_pretrained(self, path: str | Path) -> Path:
        """Save the EMA network and the noise schedule as a diffusers ``DDPMPipeline`` directory.

        ``DDPMPipeline.from_pretrained(path)`` loads it. For a conditional model the UNet keeps its class
        embedding (``class_labels`` must then be passed to the UNet; ``DDPMPipeline.__call__`` does not).
        With ``parameterization=edm`` no pipeline is written (``DDPMPipeline`` would not precondition the UNet's
        input): ``unet/`` and ``scheduler/`` load with ``UNet2DModel.from_pretrained(path, subfolder="unet")`` and
        ``EDMEulerScheduler.from_pretrained(path, subfolder="scheduler")``.
        Raises ``TypeError`` if the network is no ``UNet2DModel``.
        """
        if not isinstance(self.ema.module, UNet2DModel):
            raise TypeError(f"save_pretrained needs a diffusers UNet2DModel, got {type(self.ema.module).__name__}")
        if self.edm is not None:
            self.ema.module.save_pretrained(str(Path(path) / "unet"))
            self.noise_scheduler.save_pretrained(str(Path(path) / "scheduler"))
            return Path(path)
        pipeline = DDPMPipeline(unet=self.ema.module, scheduler=DDPMScheduler.from_config(self.noise_scheduler.config))
        pipeline.save_pretrained(str(path))
        return Path(path)


def _images(batch: Any) -> torch.Tensor:
    """Images ``(B, C, H, W)`` from a batch that is a tensor or an ``(images, labels)`` pair."""
    return batch[0] if isinstance(batch, list | tuple) else batch
