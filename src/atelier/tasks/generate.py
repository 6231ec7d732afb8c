"""The ``generate`` task: Stable Diffusion text-to-image or image-to-image with a diffusers pipeline.

Every image is a PNG with its full settings in the PNG metadata (:mod:`atelier.text2image.metadata`); the run
directory also gets ``grid.png`` and ``generate_info.json``, and W&B gets a table (prompt, negative prompt, seed,
image, CLIP score).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2.functional import pil_to_tensor

from atelier.callbacks.samples import save_grid
from atelier.text2image.metadata import save_png
from atelier.text2image.pipeline import (
    apply_lora,
    image2image_from,
    load_text2image,
    resolve_dtype,
    set_sampler,
)
from atelier.text2image.schedulers import SD_SAMPLERS
from atelier.utils.allocator import tune_cpu_allocator
from atelier.utils.config import instantiate_group, write_json
from atelier.utils.device import resolve_device
from atelier.utils.loggers import finish_wandb

log = logging.getLogger(__name__)


def read_prompts(prompt: str | Sequence[str] | None, prompt_file: str | Path | None) -> list[str]:
    """The prompts of a run: ``prompt`` (one string or a list) followed by the lines of ``prompt_file`` (UTF-8,
    one prompt per line; blank lines and lines starting with ``#`` are skipped).

    Raises:
        FileNotFoundError: when ``prompt_file`` does not exist (naming the path).
        ValueError: when ``prompt_file`` is not UTF-8 text or holds no prompt, or when no prompt is given at all.
    """
    prompts = [prompt] if isinstance(prompt, str) else [str(p) for p in (prompt or [])]
    if prompt_file is not None:
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt_file={path} does not exist")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"prompt_file={path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
        from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise ValueError(f"prompt_file={path} holds no prompt (one prompt per line; '#' lines are comments)")
        prompts += from_file
    prompts = [p.strip() for p in prompts]
    if not prompts or not all(prompts):
        raise ValueError("no prompt given: set prompt=\"...\" or prompt_file=<text file, one prompt per line>")
    return prompts


def load_init_image(path: str | Path, width: int, height: int) -> Image.Image:
    """The image-to-image start image at ``path`` as RGB, resized to ``width`` × ``height``.

    Raises:
        FileNotFoundError: when ``path`` does not exist; ``ValueError`` when it is no readable image (naming it).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init_image={path} does not exist")
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"init_image={path} is not a readable image: {err}") from err
    return image.resize((width, height), Image.Resampling.LANCZOS)


def check_options(cfg: DictConfig) -> None:
    """Raise early, before any weights are loaded, for options with bad values (each message names its key)."""
    if cfg.sampler not in SD_SAMPLERS:
        raise ValueError(f"sampler={cfg.sampler!r} is not allowed; choose one of {sorted(SD_SAMPLERS)}")
    for key in ("num_images", "num_inference_steps", "batch_size"):
        if int(cfg[key]) < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    for key in ("height", "width"):
        if cfg.get(key) is not None and int(cfg[key]) % 8:
            raise ValueError(f"{key}={cfg[key]} must be a multiple of 8")
    if cfg.get("init_image") is not None and not 0 < float(cfg.strength) <= 1:
        raise ValueError(f"strength={cfg.strength} must be in (0, 1]")
    resolve_dtype(str(cfg.precision), resolve_device(str(cfg.device)))


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


def run(cfg: DictConfig) -> dict[str, Any]:
    """Generate ``num_images`` images for every prompt; return (and write as ``generate_info.json``) the settings,
    the image list with seeds and CLIP scores, and the timings.

    Raises:
        FileNotFoundError: for a missing prompt file, init image, model directory, weights or LoRA adapter.
        ValueError: for a bad option value (the message names the key and the allowed values).
    """
    tune_cpu_allocator()  # large CPU tensors reuse freed memory (atelier.utils.allocator)
    output_dir = Path(cfg.paths.output_dir)
    check_options(cfg)
    prompts = read_prompts(_plain(cfg.get("prompt")), cfg.get("prompt_file"))
    if cfg.get("init_image") is not None and not Path(cfg.init_image).expanduser().is_file():
        raise FileNotFoundError(f"init_image={Path(cfg.init_image).expanduser()} does not exist")

    pipe = load_text2image(str(cfg.model_id), cfg.device, str(cfg.precision), cfg.get("tiny_dir"),
                           bool(cfg.attention_slicing), bool(cfg.vae_tiling))
    set_sampler(pipe, str(cfg.sampler))
    if cfg.get("lora"):
        apply_lora(pipe, cfg.lora, float(cfg.lora_scale))
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = int(cfg.get("height") or size), int(cfg.get("width") or size)
    init = None
    if cfg.get("init_image") is not None:
        init = load_init_image(cfg.init_image, width, height)
        pipe = image2image_from(pipe)

    common = {"model_id": str(cfg.model_id), "random_weights": bool(pipe.atelier_random_weights),
              "negative_prompt": cfg.get("negative_prompt"), "num_inference_steps": int(cfg.num_inference_steps),
              "guidance_scale": float(cfg.guidance_scale), "sampler": str(cfg.sampler), "height": height,
              "width": width, "precision": str(pipe.unet.dtype).removeprefix("torch."),
              "lora": str(cfg.lora) if cfg.get("lora") else None,
              "lora_scale": float(cfg.lora_scale) if cfg.get("lora") else None,
              "init_image": str(cfg.init_image) if init is not None else None,
              "strength": float(cfg.strength) if init is not None else None}
    jobs = [(i, j) for i in range(len(prompts)) for j in range(int(cfg.num_images))]
    records: list[dict[str, Any]] = []
    tensors: list[torch.Tensor] = []
    device = pipe.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for first in range(0, len(jobs), int(cfg.batch_size)):
        batch = jobs[first:first + int(cfg.batch_size)]
        seeds = [int(cfg.seed) + j for _, j in batch]
        kwargs: dict[str, Any] = {
            "prompt": [prompts[i] for i, _ in batch],
            "negative_prompt": [common["negative_prompt"]] * len(batch) if common["negative_prompt"] else None,
            "num_inference_steps": common["num_inference_steps"], "guidance_scale": common["guidance_scale"],
            "generator": [torch.Generator().manual_seed(s) for s in seeds], "output_type": "pil",
        }
        if init is None:
            kwargs.update(height=height, width=width)
        else:
            kwargs.update(image=[init] * len(batch), strength=common["strength"])
        images = pipe(**kwargs).images
        for (i, j), seed, image in zip(batch, seeds, images, strict=True):
            settings = {**common, "prompt": prompts[i], "seed": seed, "prompt_index": i, "image_index": j}
            path = save_png(image, output_dir / "images" / f"p{i:03d}_s{seed:06d}.png", settings)
            records.append({**settings, "path": str(path)})
            tensors.append(pil_to_tensor(image))
    seconds = time.perf_counter() - start
    uint8 = torch.stack(tensors)
    grid = save_grid(uint8.float() / 127.5 - 1, output_dir / "grid.png", nrow=cfg.get("nrow") or int(cfg.num_images))
    mean_clip = None
    if cfg.get("clip_score"):
        mean_clip = _add_clip_scores(cfg, pipe, uint8, records)
    info = {"settings": {**common, "prompts": prompts, "num_images": int(cfg.num_images), "seed": int(cfg.seed),
                         "batch_size": int(cfg.batch_size), "model_dir": pipe.atelier_model_dir},
            "images": records, "grid": str(grid), "clip_score": mean_clip, "seconds": round(seconds, 3),
            "images_per_second": round(len(records) / seconds, 4),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    if common["random_weights"]:
        info["note"] = "tiny random-weight model: these images are noise for tests, not results"
    write_json(info, output_dir / "generate_info.json")
    _log_table(cfg, records, grid, mean_clip)
    log.info("%d images in %.1f s (%.2f images/s): %s", len(records), seconds, info["images_per_second"], grid)
    return info


def _add_clip_scores(cfg: DictConfig, pipe: Any, images: torch.Tensor, records: list[dict[str, Any]]) -> float:
    """Score every image against its prompt (``clip_score`` key of each record); return the mean."""
    from atelier.text2image.clip_score import DEFAULT_CLIP, clip_scores, make_clip_score

    clip_model = cfg.get("clip_model")
    if clip_model is None:
        clip_model = Path(pipe.atelier_model_dir) / "clip" if pipe.atelier_random_weights else DEFAULT_CLIP
    metric = make_clip_score(clip_model).to(pipe.device)
    scores = clip_scores(metric, images, [r["prompt"] for r in records])
    for record, score in zip(records, scores.tolist(), strict=True):
        record["clip_score"] = round(score, 4)
    return round(float(metric.compute()), 4)


def _log_table(cfg: DictConfig, records: list[dict[str, Any]], grid: Path, mean_clip: float | None) -> None:
    """Log the config, a ``generations`` table (prompt, negative prompt, seed, image, CLIP score) and the grid to
    W&B (other loggers get the config); always finishes the W&B run."""
    loggers: list[Logger] = instantiate_group(cfg.get("logger"))
    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            if mean_clip is not None:
                logger.log_metrics({"generate/clip_score": mean_clip}, step=0)
            if isinstance(logger, WandbLogger):
                import wandb

                rows = [[r["prompt"], r["negative_prompt"] or "", r["seed"], wandb.Image(r["path"]),
                         r.get("clip_score")] for r in records]
                logger.log_table(key="generations", columns=["prompt", "negative_prompt", "seed", "image",
                                                             "clip_score"], data=rows)
                logger.log_image(key="grid", images=[str(grid)])
            logger.save()
            logger.finalize("success")
    finally:
        finish_wandb()
