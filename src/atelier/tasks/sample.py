"""The ``sample`` task: load any Atelier checkpoint and draw images through the model's ``sample`` method."""

from __future__ import annotations

import inspect
import logging
import math
import re
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
from atelier.data.label_counts import stored_label_counts
from atelier.sampling.guidance import prior_labels, rows_per_class
from atelier.sampling.interface import accepted_kwargs
from atelier.sampling.loop import autocast_kwargs
from atelier.utils.allocator import tune_cpu_allocator
from atelier.utils.config import write_json
from atelier.utils.device import resolve_device
from atelier.utils.hydra_jobs import register_resolvers

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
        register_resolvers()  # the run's config may use Atelier's resolvers (e.g. ${atelier.lowest_resolution:...})
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


def recipe_sampling(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The recipe's ``sampling`` defaults that training stored in ``checkpoint`` (``{}`` when it stored none)."""
    return dict(checkpoint.get(CONFIG_KEY, {}).get("sampling") or {})


#: the ``label_distribution`` values: equal counts per class, or the training split's class frequencies
LABEL_CHOICES = ("balanced", "prior")


def label_choice(cfg: DictConfig) -> str:
    """The label distribution to sample a conditional model with: ``label_distribution`` when set, else the
    recipe's ``sampling.label_distribution`` stored in the checkpoint (``ddpm_kmeans_mnist_cpu`` asks for
    ``prior``: its clusters are sampled by their frequencies), else ``balanced``."""
    if cfg.get("label_distribution") is not None:
        return str(cfg.label_distribution)
    checkpoint = torch.load(Path(cfg.ckpt_path).expanduser(), map_location="cpu", weights_only=True, mmap=True)
    recipe = recipe_sampling(checkpoint).get("label_distribution")
    return str(recipe) if recipe is not None else "balanced"


def checkpoint_prior_labels(ckpt_path: str | Path, n: int) -> torch.Tensor:
    """``(n,)`` int64 labels by the training label counts stored in the checkpoint
    (:func:`atelier.sampling.guidance.prior_labels`), so ``sample.py`` draws from ``p(x)`` without the data.

    Raises:
        ValueError: when the checkpoint stores no counts (unconditional, or written before stop 38), naming
            ``evaluate.py`` (which counts them from the data) and ``label_distribution=balanced``.
    """
    path = Path(ckpt_path).expanduser()
    counts = stored_label_counts(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    if counts is None:
        raise ValueError(f"label_distribution=prior: {path} stores no training label counts (an unconditional "
                         "model, or a checkpoint written before they were stored); use label_distribution=balanced "
                         "or class_labels=[...], or score it with evaluate.py, which counts them from the data")
    return prior_labels(n, counts)


def recipe_guide(ckpt_path: str | Path) -> tuple[str, float] | None:
    """The guide checkpoint and weight that the run's recipe asks for, or ``None`` when it asks for none.

    A recipe opts in with ``sampling.autoguidance: {guide_fraction: f, scale: w}`` in its training config (stored in
    every checkpoint): the guide is the run's own earlier ``step_*.ckpt`` beside ``ckpt_path`` whose step is nearest to
    ``f ×`` the main checkpoint's global step (a fraction, so that a faster machine, which trains more steps in the
    same budget, picks a later step).

    Raises:
        FileNotFoundError: when the recipe asks for a guide but no earlier ``step_*.ckpt`` lies beside ``ckpt_path``.
    """
    path = Path(ckpt_path).expanduser()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    wanted = recipe_sampling(checkpoint).get("autoguidance")
    if not wanted:
        return None
    main_step = int(checkpoint.get("global_step", 0))
    target = float(wanted["guide_fraction"]) * main_step
    candidates = {int(m.group(1)): p for p in path.parent.glob("step_*.ckpt")
                  if (m := re.fullmatch(r"step_(\d+)\.ckpt", p.name)) and int(m.group(1)) < main_step}
    if not candidates:
        raise FileNotFoundError(
            f"the recipe of {path} samples with autoguidance by its own checkpoint near step {target:.0f}, but no "
            f"step_*.ckpt earlier than its step {main_step} lies in {path.parent}: pass guide_ckpt_path=<an "
            "earlier checkpoint of the run>, or autoguidance_scale=1 to sample without a guide")
    step = min(candidates, key=lambda s: (abs(s - target), s))
    return str(candidates[step]), float(wanted.get("scale", 2.0))


def guide_choice(cfg: DictConfig) -> tuple[str | None, float | None]:
    """``(guide checkpoint, autoguidance weight)`` for a sample/evaluate config: an explicit ``guide_ckpt_path``
    wins; ``autoguidance_scale=1`` without one turns guidance off; otherwise the recipe's own choice
    (:func:`recipe_guide`), if any. ``(None, None)``: no autoguidance.

    Raises:
        ValueError: when ``autoguidance_scale`` (≠ 1) is set, no guide is given and the recipe names none.
    """
    path, scale = cfg.get("guide_ckpt_path"), cfg.get("autoguidance_scale")
    if path is not None:
        return str(path), 2.0 if scale is None else float(scale)
    if scale is not None and float(scale) == 1.0:
        return None, None
    recipe = recipe_guide(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    if recipe is None:
        if scale is not None:
            raise ValueError(f"autoguidance_scale={scale} needs guide_ckpt_path=<an earlier checkpoint of the run>")
        return None, None
    return recipe[0], recipe[1] if scale is None else float(scale)


def guide_kwargs(model: L.LightningModule, cfg: DictConfig) -> dict[str, Any]:
    """``{"guide": net, "autoguidance_scale": w}`` for autoguidance (Karras et al. 2024) when :func:`guide_choice`
    picks a guide (``guide_ckpt_path``, or the recipe's own), else ``{}``. The guide is the EMA network of that
    checkpoint (typically an earlier checkpoint of the same run), on ``model``'s device.

    Raises:
        ValueError: see :func:`guide_choice`; also when ``model.sample`` takes no ``guide`` (only DDPMs do), or the
            guide is another model class or differs in :func:`guide_contract` (a smaller or narrower network is
            allowed: the paper's guide is one).
        FileNotFoundError: when the guide checkpoint does not exist.
    """
    path, scale = guide_choice(cfg)
    if path is None:
        return {}
    if "guide" not in inspect.signature(model.sample).parameters:
        raise ValueError(f"guide_ckpt_path is set, but {type(model).__name__}.sample takes no guide network; "
                         "autoguidance is for DDPM checkpoints")
    if cfg.get("guide_ckpt_path") is None:
        log.info("autoguidance as the run's recipe asks: guide %s, w = %s (autoguidance_scale=1 turns it off)",
                 path, scale)
    guide = load_module(path)
    if type(guide) is not type(model):
        raise ValueError(f"guide_ckpt_path={path} holds a {type(guide).__name__}, ckpt_path a {type(model).__name__}; "
                         "autoguidance needs a DDPM guide")
    differ = {k: (guide_v, model_v) for k, (guide_v, model_v) in guide_contract(guide, model).items()
              if guide_v != model_v}
    if differ:
        raise ValueError(f"guide_ckpt_path={path} holds a different model than ckpt_path: "
                         + ", ".join(f"{k} {g!r} (guide) vs {m!r}" for k, (g, m) in differ.items())
                         + "; autoguidance needs the same images, noise schedule and parameterization (the width "
                         "and depth of the network may differ)")
    return {"guide": guide.ema.module.to(model.device), "autoguidance_scale": scale}


GUIDE_HPARAMS = ("parameterization", "prediction_type", "num_classes", "beta_schedule", "num_train_timesteps",
                 "sigma_data", "sigma_min", "sigma_max")


def guide_contract(guide: L.LightningModule, model: L.LightningModule) -> dict[str, tuple[Any, Any]]:
    """``{key: (guide's value, model's value)}`` of what a guide must share with the model it guides: the image
    shape ``(C, H, W)``, the network's output channels and the noise-schedule / parameterization hyperparameters
    (:data:`GUIDE_HPARAMS`). The network's widths, depth and attention are free: Karras et al. 2024 (Sec. 3) guide
    with a smaller, shorter-trained version of the model."""
    def out_channels(m: L.LightningModule) -> Any:
        return getattr(getattr(getattr(m, "net", None), "config", None), "out_channels", None)

    pairs: dict[str, tuple[Any, Any]] = {
        "image_shape": (tuple(guide.image_shape), tuple(model.image_shape)),
        "out_channels": (out_channels(guide), out_channels(model)),
    }
    pairs.update({k: (guide.hparams.get(k), model.hparams.get(k)) for k in GUIDE_HPARAMS})
    return pairs


def requested_labels(cfg: DictConfig, conditional: bool = False, choice: str | None = None) -> torch.Tensor | None:
    """``(num_samples,)`` int64 labels from ``class_labels`` (a list: ``ceil(num_samples / len)`` consecutive
    images per listed class, one grid row each) or ``class_label`` (one class for every image); else, for a
    ``conditional`` model whose :func:`label_choice` is ``prior``, labels by the stored training frequencies
    (:func:`checkpoint_prior_labels`; ``choice``, when given, is that label choice already decided); ``None``
    otherwise (the model's default: one row per class).

    Raises:
        ValueError: when both are set, ``class_labels`` is empty, or ``label_distribution`` is not one of
            :data:`LABEL_CHOICES`.
    """
    many, one = cfg.get("class_labels"), cfg.get("class_label")
    if many is not None and one is not None:
        raise ValueError("set class_labels=[...] or class_label=k, not both")
    if one is not None:
        many = [one]
    if many is None:
        if not conditional:
            return None
        choice = choice or label_choice(cfg)
        if choice not in LABEL_CHOICES:
            raise ValueError(f"label_distribution={choice!r}: allowed values are {list(LABEL_CHOICES)}")
        return checkpoint_prior_labels(cfg.ckpt_path, int(cfg.num_samples)) if choice == "prior" else None
    classes = torch.as_tensor([int(c) for c in many], dtype=torch.long)
    if classes.numel() == 0:
        raise ValueError("class_labels=[] is empty; list at least one class or leave it null")
    return classes[rows_per_class(int(cfg.num_samples), classes.numel())]


def check_requested_classes(cfg: DictConfig, num_classes: int | None) -> None:
    """Check ``class_labels`` / ``class_label`` against the model's classes.

    Raises:
        ValueError: when a class is asked of an unconditional model (``num_classes`` ``None``), or a class lies
            outside ``[0, num_classes)``, naming the key and the allowed range.
    """
    key = "class_labels" if cfg.get("class_labels") is not None else "class_label"
    asked = cfg.get(key)
    if asked is None:
        return
    classes = [int(c) for c in (asked if key == "class_labels" else [asked])]
    if num_classes is None:
        raise ValueError(f"{key}={asked} was given, but this checkpoint's model is unconditional (no classes); "
                         "leave it null")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"{key}={asked}: {bad} outside this model's {num_classes} classes; choose from 0 to "
                         f"{num_classes - 1}")


def interval_option(cfg: DictConfig) -> list[float] | None:
    """``cfg.guidance_interval`` (``[σ_lo, σ_hi]``, Kynkäänniemi et al. 2024) as plain floats, or ``None``; its
    values are checked by ``DDPM.sample`` (:func:`atelier.models.ddpm_sampling.check_interval`).

    Raises:
        ValueError: naming the key when it is a single value instead of a list.
    """
    value = cfg.get("guidance_interval")
    if value is None:
        return None
    if isinstance(value, int | float | str):
        raise ValueError(f"guidance_interval={value!r} must be a list [σ_lo, σ_hi] (e.g. [0.28,5.42]) or null")
    return [float(v) for v in value]


def sample_kwargs(model: L.LightningModule, cfg: DictConfig, choice: str | None = None) -> dict[str, Any]:
    """The sampler options in ``cfg`` that ``model.sample`` accepts and that are set (not null).

    ``class_labels`` / ``class_label`` become ``labels`` (:func:`requested_labels`); ``guidance_scale`` and
    ``guidance_interval`` are passed to models that take them (DDPMs).
    """
    options = {k: cfg.get(k) for k in ("sampler", "num_inference_steps", "batch_size", "guidance_scale",
                                          "sampling_prior")}
    options["guidance_interval"] = interval_option(cfg)
    num_classes = getattr(model, "num_classes", None)
    options["labels"] = requested_labels(cfg, isinstance(num_classes, int), choice)
    check_requested_classes(cfg, num_classes if isinstance(num_classes, int) else None)
    kwargs = accepted_kwargs(model, options)
    kwargs.update(autocast_kwargs(model, cfg.get("autocast")))
    kwargs.update(guide_kwargs(model, cfg))
    return kwargs


def grid_nrow(model: L.LightningModule, cfg: DictConfig, n: int, choice: str | None = None) -> int | None:
    """``cfg.nrow`` if set; else one class per row for conditional models (listed or all classes), unless the label
    ``choice`` (decided by :func:`label_choice` when not given) is ``prior``: then, as for others, ``None``."""
    if cfg.get("nrow"):
        return int(cfg.nrow)
    many = cfg.get("class_labels")
    if many:
        return math.ceil(n / len(many))
    if cfg.get("class_label") is not None:
        return None
    if isinstance(getattr(model, "num_classes", None), int) and (choice or label_choice(cfg)) == "prior":
        return None  # classes by their frequencies: a square grid, not one row per class
    return class_rows(model, n)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Draw ``cfg.num_samples`` images; write ``grid.png``, ``images/*.png`` and ``sample_info.json``.

    Raises:
        ValueError: for ``num_samples`` < 1 (before the checkpoint is read), and the model's own sampling errors.
        TypeError: for an image-to-image checkpoint (style transfer, restoration), which has no ``sample``.
    """
    tune_cpu_allocator()  # large CPU tensors reuse freed memory (atelier.utils.allocator)
    output_dir = Path(cfg.paths.output_dir)
    if int(cfg.num_samples) < 1:
        raise ValueError(f"num_samples={cfg.num_samples} is not allowed; draw at least 1 image")
    device = resolve_device(cfg.device)
    model = load_module(cfg.ckpt_path, ema_sigma_rel=cfg.get("ema_sigma_rel")).to(device)
    if not callable(getattr(model, "sample", None)):
        raise TypeError(f"{type(model).__name__} is an image-to-image model, not a generator: apply it to images "
                        "with stylize.py (style transfer) or restore.py (restoration)")
    conditional = isinstance(getattr(model, "num_classes", None), int)
    explicit = cfg.get("class_labels") is not None or cfg.get("class_label") is not None
    choice = label_choice(cfg) if conditional and not explicit else None  # decided once: one checkpoint read
    kwargs = sample_kwargs(model, cfg, choice)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    start = time.perf_counter()
    images = model.sample(int(cfg.num_samples), generator=generator, **kwargs)
    seconds = time.perf_counter() - start
    grid = save_grid(images, output_dir / "grid.png", nrow=grid_nrow(model, cfg, len(images), choice))
    if cfg.get("save_images", True):
        folder = output_dir / "images"
        for i, image in enumerate(images):
            save_grid(image[None], folder / f"{i:05d}.png", nrow=1)
    info = {"ckpt_path": str(cfg.ckpt_path), "num_samples": int(cfg.num_samples), "seed": int(cfg.seed),
            "sample_kwargs": {k: v for k, v in kwargs.items() if k not in ("labels", "guide")},
            "guide_ckpt_path": guide_choice(cfg)[0] if "guide" in kwargs else None,
            "class_label": cfg.get("class_label"),
            "label_distribution": choice,
            "labels": kwargs["labels"].tolist() if "labels" in kwargs else None, "seconds": round(seconds, 3),
            "seconds_per_image": round(seconds / max(1, int(cfg.num_samples)), 5), "grid": str(grid),
            "shape": list(images.shape)}
    write_json(info, output_dir / "sample_info.json")
    log.info("%d samples in %.1f s (%.3f s/image): %s", cfg.num_samples, seconds, info["seconds_per_image"], grid)
    return info
