"""The ``restore`` task: apply a trained restoration model (``model=restore``) to an image or a folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from omegaconf import DictConfig
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from atelier.data.art_folder import IMAGE_EXTENSIONS, find_images
from atelier.models.restore import Restoration
from atelier.style.color import luminance
from atelier.style.io import load_image, save_png, side_by_side
from atelier.tasks.sample import load_module
from atelier.utils.allocator import tune_cpu_allocator
from atelier.utils.config import write_json
from atelier.utils.device import resolve_device
from atelier.utils.media import log_task_results

log = logging.getLogger(__name__)


def input_paths(path: str | Path) -> list[Path]:
    """The image file ``path``, or every image under the folder ``path`` (recursive, sorted).

    Raises:
        FileNotFoundError: when ``path`` does not exist, or is a folder without images (naming it).
    """
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = find_images(path)
        if not found:
            raise FileNotFoundError(f"input={path} holds no image ({', '.join(IMAGE_EXTENSIONS)}, "
                                    "searched recursively)")
        return found
    raise FileNotFoundError(f"input={path} does not exist")


def image_metrics(pred: torch.Tensor, clean: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of ``(1, C, H, W)`` images in ``[-1, 1]``, on intensities in ``[0, 1]`` with
    ``data_range=1.0``."""
    p, c = (pred.float().clamp(-1, 1) + 1) / 2, (clean.float().clamp(-1, 1) + 1) / 2
    return {"psnr": float(peak_signal_noise_ratio(p, c, data_range=1.0)),
            "ssim": float(structural_similarity_index_measure(p, c, data_range=1.0))}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Restore ``cfg.input`` (a file or a folder) with the model in ``cfg.ckpt_path``.

    Writes into ``cfg.paths.output_dir``: ``restored/<relative path>.png`` (settings in the PNG metadata),
    ``panels/<relative path>.png`` (input | restored, or degraded | restored | clean with ``degrade``) and
    ``restore_info.json`` (per-image PSNR/SSIM with ``degrade``); logs the first panels and mean metrics to W&B.

    Raises:
        FileNotFoundError: for a missing checkpoint or input (naming it).
        ValueError: for an unreadable input image (naming it), or a checkpoint that is not a restoration model.
        KeyError: for a ``degrade`` name the model does not have (listing those it has).
    """
    tune_cpu_allocator()  # large CPU tensors reuse freed memory (atelier.utils.allocator)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = input_paths(cfg.input)
    root = Path(cfg.input).expanduser() if Path(cfg.input).expanduser().is_dir() else paths[0].parent
    device = resolve_device(cfg.device)
    model = load_module(cfg.ckpt_path).to(device)
    if not isinstance(model, Restoration):
        raise ValueError(f"ckpt_path={cfg.ckpt_path} holds a {type(model).__name__}, not a model=restore checkpoint")
    degradation = model.degradation(cfg.degrade) if cfg.get("degrade") else None
    channels = model.net.config.in_channels if isinstance(model.net, UNet2DModel) else 3
    generator = torch.Generator().manual_seed(int(cfg.seed))
    settings = {"ckpt_path": str(cfg.ckpt_path), "degrade": cfg.get("degrade"), "size": cfg.get("size")}

    results: list[dict[str, Any]] = []
    panels: dict[str, Path] = {}
    start = time.perf_counter()
    for path in paths:
        x = load_image(path, cfg.get("size"))
        if channels == 1:
            x = luminance(x)[:, :1]
        y = degradation(x, generator) if degradation is not None else x
        restored = model.restore(y).cpu()
        name = path.relative_to(root).with_suffix(".png")
        row: dict[str, Any] = {"input": str(path), "shape": list(x.shape[1:])}
        if degradation is not None:
            row |= {f"{k}_input": v for k, v in image_metrics(y, x).items()}
            row |= image_metrics(restored, x)
            panel = side_by_side([y, restored, x])
        else:
            panel = side_by_side([x, restored])
        row["output"] = str(save_png(restored, output_dir / "restored" / name, {**settings, "input": str(path)}))
        panel_path = save_png(panel, output_dir / "panels" / name, {**settings, "input": str(path)})
        if len(panels) < int(cfg.log_panels):
            panels[f"panel/{name.with_suffix('')}"] = panel_path
        results.append(row)
    seconds = time.perf_counter() - start

    means = {k: sum(r[k] for r in results) / len(results)
             for k in ("psnr", "ssim", "psnr_input", "ssim_input") if k in results[0]}
    info = {**settings, "images": len(results), "seconds": round(seconds, 2), **{f"mean_{k}": v for k, v in
                                                                               means.items()}, "results": results}
    write_json(info, output_dir / "restore_info.json")
    summary = ", ".join(f"{k} {v:.4g}" for k, v in means.items())
    log.info("restored %d image(s) in %.1f s%s: %s", len(results), seconds, f" ({summary})" if summary else "",
             output_dir)
    log_task_results(cfg, panels, {"seconds": seconds, **means})
    return info
