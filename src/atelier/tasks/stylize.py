"""The ``stylize`` task: style transfer of one content image by optimisation (Gatys et al. 2016), with a trained
feed-forward network (Johnson et al. 2016) or with a trained AdaIN decoder (Huang & Belongie 2017)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from atelier.style.color import preserve_color
from atelier.style.io import load_image, save_png, side_by_side
from atelier.style.optimize import stylize_gatys
from atelier.style.vgg import VGGFeatures
from atelier.tasks.sample import load_module
from atelier.utils.allocator import tune_cpu_allocator
from atelier.utils.config import write_json
from atelier.utils.device import resolve_device
from atelier.utils.media import log_task_results

log = logging.getLogger(__name__)

METHODS = ("gatys", "fast", "adain")
RANDOM_VGG_NOTE = ("made with RANDOM VGG-19 weights (vgg_weights=random): a plumbing/test output, NOT a style "
                   "transfer result")


def style_paths(style: Any) -> list[str]:
    """``cfg.style`` (a path or a list of paths) as a list of strings; ``[]`` when unset."""
    if style is None:
        return []
    if isinstance(style, str):
        return [style]
    if isinstance(style, ListConfig | Sequence):
        return [str(s) for s in style]
    raise ValueError(f"style must be a path or a list of paths, got {style!r}")


def _load_module_as(ckpt_path: str | None, cls_path: str, method: str) -> Any:
    if not ckpt_path:
        raise ValueError(f"method={method} needs ckpt_path=<a checkpoint trained with model={method_model(method)}>")
    model = load_module(ckpt_path)
    if f"{type(model).__module__}.{type(model).__name__}" != cls_path:
        raise ValueError(f"ckpt_path={ckpt_path} holds a {type(model).__name__}, not a model={method_model(method)} "
                         f"checkpoint (method={method})")
    return model


def method_model(method: str) -> str:
    return {"fast": "fast_style", "adain": "adain"}.get(method, method)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Stylise ``cfg.content``; write ``stylized.png`` (settings in its PNG metadata), ``panel.png`` (content |
    style(s) | result), ``stylize_info.json`` into ``cfg.paths.output_dir`` and log them to W&B.

    Raises:
        ValueError: for an unknown method, missing styles or checkpoint, or a checkpoint of another model.
        FileNotFoundError: for a missing content/style/checkpoint file (naming it).
        VGGWeightsError: when the ImageNet VGG-19 weights are needed but not available.
    """
    tune_cpu_allocator()  # large CPU tensors reuse freed memory (atelier.utils.allocator)
    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r} is not allowed; choose one of {list(METHODS)}")
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    torch.manual_seed(int(cfg.seed))
    content = load_image(cfg.content, cfg.size)
    paths = style_paths(cfg.get("style"))
    weights = list(cfg.style_weights) if cfg.get("style_weights") is not None else None
    if weights is not None and len(weights) != len(paths):
        raise ValueError(f"style_weights has {len(weights)} entries for {len(paths)} style image(s)")
    styles = [load_image(p, cfg.style_size or cfg.size) for p in paths]
    settings: dict[str, Any] = {"method": cfg.method, "content": str(cfg.content), "style": paths,
                                "style_weights": weights, "preserve_color": bool(cfg.preserve_color),
                                "color_space": cfg.color_space, "size": list(content.shape[-2:])}
    losses: dict[str, float] = {}
    start = time.perf_counter()

    if cfg.method == "gatys":
        if not styles:
            raise ValueError("method=gatys needs style=<image> (or a list of images)")
        g = cfg.gatys
        vgg = VGGFeatures([*g.content_layers, *g.style_layers], g.vgg_weights, g.pool).to(device)
        result = stylize_gatys(
            content, styles, vgg, style_weights=weights, content_layers=list(g.content_layers),
            style_layers=list(g.style_layers), content_weight=g.content_weight, style_weight=g.style_weight,
            tv_weight=g.tv_weight, optimizer=g.optimizer, steps=int(g.steps), lr=g.lr, init=g.init,
            preserve_colors=bool(cfg.preserve_color), color_space=cfg.color_space,
            generator=torch.Generator().manual_seed(int(cfg.seed)), progress=bool(cfg.progress))
        image = result.image
        settings |= {"gatys": OmegaConf.to_container(g, resolve=True), "vgg_weights": g.vgg_weights,
                     "evaluations": result.evaluations}
        losses = {f"loss/{k}": v for k, v in result.history[-1].items()}
        losses |= {f"loss_initial/{k}": v for k, v in result.history[0].items()}
    elif cfg.method == "fast":
        model = _load_module_as(cfg.ckpt_path, "atelier.models.fast_style.FastStyle", "fast").to(device)
        if styles:
            log.warning("method=fast: the style is built into the network; style=%s is only shown in the panel", paths)
        elif Path(model.hparams.style_image).is_file():
            styles = [load_image(model.hparams.style_image, cfg.style_size or cfg.size)]
        image = model.stylize(content)
        if cfg.preserve_color:
            image = preserve_color(image, content.to(image.device), cfg.color_space)
        settings |= {"ckpt_path": str(cfg.ckpt_path), "vgg_weights": model.hparams.vgg_weights,
                     "style_image": model.hparams.style_image}
    else:
        if not styles:
            raise ValueError("method=adain needs style=<image> (or a list of images with style_weights)")
        model = _load_module_as(cfg.ckpt_path, "atelier.models.adain.AdaINStyle", "adain").to(device)
        image = model.stylize(content, styles, weights, float(cfg.alpha), bool(cfg.preserve_color), cfg.color_space)
        settings |= {"ckpt_path": str(cfg.ckpt_path), "vgg_weights": model.hparams.vgg_weights,
                     "alpha": float(cfg.alpha)}

    seconds = time.perf_counter() - start
    valid = settings.get("vgg_weights") != "random"
    settings |= {"seconds": round(seconds, 2), "valid_stylization": valid}
    if not valid:
        settings["note"] = RANDOM_VGG_NOTE
        log.warning("This output was %s", RANDOM_VGG_NOTE)
    result_path = save_png(image, output_dir / "stylized.png", settings)
    panel_path = save_png(side_by_side([content, *styles, image.cpu()]), output_dir / "panel.png", settings)
    info = {**settings, "output": str(result_path), "panel": str(panel_path), **losses}
    write_json(info, output_dir / "stylize_info.json")
    log.info("%s stylisation in %.1f s: %s (panel: %s)", cfg.method, seconds, result_path, panel_path)
    log_task_results(cfg, {"stylized": result_path, "panel": panel_path}, {"seconds": seconds, **losses})
    return info
