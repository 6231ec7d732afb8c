"""The ``sample`` task: load any Atelier checkpoint and draw images through the model's ``sample`` method."""

from __future__ import annotations

import inspect
import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from atelier.callbacks.checkpoint_extras import CONFIG_KEY
from atelier.callbacks.posthoc_ema import apply_posthoc_ema
from atelier.callbacks.samples import class_rows, save_grid
from atelier.sampling.guidance import rows_per_class
from atelier.sampling.interface import accepted_kwargs
from atelier.sampling.loop import autocast_kwargs
from atelier.utils.config import write_json
from atelier.utils.device import resolve_device

log = logging.getLogger(__name__)


def stored_config(checkpoint: dict[str, Any], path: Path, section: str) -> dict[str, Any]:
    """The ``section`` (``model`` or ``data``) config that training stored in ``checkpoint``; for older
    checkpoints, the one in ``.hydra/config.yaml`` of the run directory that holds ``checkpoints/``.

    Raises:
        KeyError: when neither the checkpoint nor its run directory holds that config.
    """
    stored = checkpoint.get(CONFIG_KEY, {}).get(section)
    if stored is None:
        run_cfg = path.resolve().parent.parent / ".hydra" / "config.yaml"
        if not run_cfg.is_file():
            raise KeyError(f"{path} holds no {section} config and {run_cfg} does not exist")
        stored = OmegaConf.to_container(OmegaConf.load(run_cfg)[section], resolve=True)
    return dict(stored)


def load_module(ckpt_path: str | Path, map_location: str | torch.device = "cpu",
                ema_sigma_rel: float | None = None) -> L.LightningModule:
    """Rebuild the LightningModule stored in an Atelier checkpoint and load its weights (EMA included).

    The model config comes from :func:`stored_config`. Loads with ``weights_only=True``. With ``ema_sigma_rel``
    the EMA network is replaced by the post-hoc EMA of that relative length, synthesised from the run's
    ``posthoc_ema/`` snapshots (:func:`atelier.callbacks.posthoc_ema.apply_posthoc_ema`).

    Raises:
        FileNotFoundError: when the checkpoint does not exist (naming the path), or ``ema_sigma_rel`` is given but
            the run has no post-hoc EMA snapshots.
        KeyError: when neither the checkpoint nor its run directory holds a model config.
    """
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={path} does not exist")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    stored = stored_config(checkpoint, path, "model")
    model: L.LightningModule = hydra.utils.instantiate(OmegaConf.create(stored))
    model.load_state_dict(checkpoint["state_dict"])
    if ema_sigma_rel is not None:
        apply_posthoc_ema(model, path, float(ema_sigma_rel))
    model.eval()
    return model


def guide_kwargs(model: L.LightningModule, cfg: DictConfig) -> dict[str, Any]:
    """``{"guide": net, "autoguidance_scale": w}`` for autoguidance (Karras et al. 2024) when ``cfg.guide_ckpt_path``
    is set, else ``{}``. The guide is the EMA network of that checkpoint (typically an earlier checkpoint of the same
    run), on ``model``'s device.

    Raises:
        ValueError: when ``autoguidance_scale`` is set without ``guide_ckpt_path``, when ``model.sample`` takes no
            ``guide`` (only DDPMs do), or the guide's model class or network config differs from ``model``'s
            (autoguidance needs the same architecture and parameterization).
        FileNotFoundError: when ``guide_ckpt_path`` does not exist.
    """
    path, scale = cfg.get("guide_ckpt_path"), cfg.get("autoguidance_scale")
    if path is None:
        if scale is not None and float(scale) != 1.0:
            raise ValueError(f"autoguidance_scale={scale} needs guide_ckpt_path=<an earlier checkpoint of the run>")
        return {}
    if "guide" not in inspect.signature(model.sample).parameters:
        raise ValueError(f"guide_ckpt_path is set, but {type(model).__name__}.sample takes no guide network; "
                         "autoguidance is for DDPM checkpoints")
    guide = load_module(path)
    same_net = getattr(getattr(guide, "net", None), "config", None) == getattr(getattr(model, "net", None), "config",
                                                                               None)
    same_hparams = {k: guide.hparams.get(k) for k in ("parameterization", "prediction_type", "num_classes")} == \
        {k: model.hparams.get(k) for k in ("parameterization", "prediction_type", "num_classes")}
    if type(guide) is not type(model) or not same_net or not same_hparams:
        raise ValueError(f"guide_ckpt_path={path} holds a different model ({type(guide).__name__}, network or "
                         f"parameterization) than ckpt_path; autoguidance needs a checkpoint of the same model")
    return {"guide": guide.ema.module.to(model.device), "autoguidance_scale": 2.0 if scale is None else float(scale)}


def requested_labels(cfg: DictConfig) -> torch.Tensor | None:
    """``(num_samples,)`` int64 labels from ``class_labels`` (a list: ``ceil(num_samples / len)`` consecutive
    images per listed class, one grid row each) or ``class_label`` (one class for every image); ``None`` if
    neither is set.

    Raises:
        ValueError: when both are set, or ``class_labels`` is empty.
    """
    many, one = cfg.get("class_labels"), cfg.get("class_label")
    if many is not None and one is not None:
        raise ValueError("set class_labels=[...] or class_label=k, not both")
    if one is not None:
        many = [one]
    if many is None:
        return None
    classes = torch.as_tensor([int(c) for c in many], dtype=torch.long)
    if classes.numel() == 0:
        raise ValueError("class_labels=[] is empty; list at least one class or leave it null")
    return classes[rows_per_class(int(cfg.num_samples), classes.numel())]


def sample_kwargs(model: L.LightningModule, cfg: DictConfig) -> dict[str, Any]:
    """The sampler options in ``cfg`` that ``model.sample`` accepts and that are set (not null).

    ``class_labels`` / ``class_label`` become ``labels`` (:func:`requested_labels`); ``guidance_scale`` is
    passed to models that take it (class-conditional DDPMs).
    """
    options = {k: cfg.get(k) for k in ("sampler", "num_inference_steps", "batch_size", "guidance_scale",
                                          "sampling_prior")}
    options["labels"] = requested_labels(cfg)
    kwargs = accepted_kwargs(model, options)
    kwargs.update(autocast_kwargs(model, cfg.get("autocast")))
    kwargs.update(guide_kwargs(model, cfg))
    return kwargs


def grid_nrow(model: L.LightningModule, cfg: DictConfig, n: int) -> int | None:
    """``cfg.nrow`` if set; else one class per row for conditional models (listed or all classes); else ``None``."""
    if cfg.get("nrow"):
        return int(cfg.nrow)
    many = cfg.get("class_labels")
    if many:
        return math.ceil(n / len(many))
    if cfg.get("class_label") is not None:
        return None
    return class_rows(model, n)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Draw ``cfg.num_samples`` images; write ``grid.png``, ``images/*.png`` and ``sample_info.json``."""
    output_dir = Path(cfg.paths.output_dir)
    device = resolve_device(cfg.device)
    model = load_module(cfg.ckpt_path, ema_sigma_rel=cfg.get("ema_sigma_rel")).to(device)
    if not callable(getattr(model, "sample", None)):
        raise TypeError(f"{type(model).__name__} is an image-to-image model, not a generator: apply it to images "
                        "with stylize.py (style transfer) or restore.py (restoration)")
    kwargs = sample_kwargs(model, cfg)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    start = time.perf_counter()
    images = model.sample(int(cfg.num_samples), generator=generator, **kwargs)
    seconds = time.perf_counter() - start
    grid = save_grid(images, output_dir / "grid.png", nrow=grid_nrow(model, cfg, len(images)))
    if cfg.get("save_images", True):
        folder = output_dir / "images"
        for i, image in enumerate(images):
            save_grid(image[None], folder / f"{i:05d}.png", nrow=1)
    info = {"ckpt_path": str(cfg.ckpt_path), "num_samples": int(cfg.num_samples), "seed": int(cfg.seed),
            "sample_kwargs": {k: v for k, v in kwargs.items() if k not in ("labels", "guide")},
            "guide_ckpt_path": cfg.get("guide_ckpt_path"),
            "class_label": cfg.get("class_label"),
            "labels": kwargs["labels"].tolist() if "labels" in kwargs else None, "seconds": round(seconds, 3),
            "seconds_per_image": round(seconds / max(1, int(cfg.num_samples)), 5), "grid": str(grid),
            "shape": list(images.shape)}
    write_json(info, output_dir / "sample_info.json")
    log.info("%d samples in %.1f s (%.3f s/image): %s", cfg.num_samples, seconds, info["seconds_per_image"], grid)
    return info
