"""The ``evaluate`` task: FID/KID/IS of any Atelier checkpoint's samples under a recorded protocol.

``python evaluate.py ckpt_path=... metrics=[fid,kid,is] num_samples=10000 feature_extractor=mnist_classifier``
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from atelier.data.label_counts import train_label_counts
from atelier.metrics.evaluator import Evaluator
from atelier.sampling.guidance import prior_labels
from atelier.sampling.loop import autocast_kwargs
from atelier.tasks.sample import (
    LABEL_CHOICES,
    guide_choice,
    guide_kwargs,
    interval_option,
    label_choice,
    load_module,
    stored_config,
)
from atelier.utils.allocator import tune_cpu_allocator
from atelier.utils.config import instantiate_group, run_info, write_json
from atelier.utils.device import resolve_device
from atelier.utils.loggers import finish_wandb

log = logging.getLogger(__name__)

#: the sub-network that draws samples, per family (parameters counted in tables)
SAMPLING_NETS = ("net", "generator", "decoder")


def reference_datamodule(ckpt_path: str | Path, data_dir: str | None = None,
                         image_size: int | None = None) -> L.LightningDataModule:
    """The datamodule a checkpoint was trained on (config stored in the checkpoint, else the run's
    ``.hydra/config.yaml``), optionally with another ``data_dir`` and reference ``image_size`` (px: compare
    models trained at different sizes against the same real images, e.g. the art extractor's 64 px; generated
    images are resized by the extractor); ``setup()`` already called.

    Raises:
        KeyError: when neither the checkpoint nor its run directory holds a data config.
        ValueError: for an ``image_size`` on a datamodule config that has no ``image_size`` key.
    """
    path = Path(ckpt_path).expanduser()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    stored = stored_config(checkpoint, path, "data")
    if data_dir:
        stored["data_dir"] = str(data_dir)
    if image_size:
        if "image_size" not in stored:
            raise ValueError(f"reference_image_size={image_size}: the data config of {path} has no image_size key")
        stored["image_size"] = int(image_size)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(OmegaConf.create(stored))
    datamodule.setup("fit")
    return datamodule


def evaluation_labels(choice: str, n: int, num_classes: int, datamodule: L.LightningDataModule) -> torch.Tensor:
    """``(n,)`` int64 labels for sampling a conditional model in an evaluation: ``balanced`` (``i % K``, equal
    counts) or ``prior`` (the training split's class frequencies, :func:`atelier.sampling.guidance.prior_labels`:
    samples of ``p(x)``, comparable with an unconditional model against the same reference).

    Raises:
        ValueError: naming ``label_distribution`` and the allowed values for another choice.
    """
    if choice == "balanced":
        return torch.arange(n) % num_classes
    if choice == "prior":
        return prior_labels(n, train_label_counts(datamodule, num_classes))
    raise ValueError(f"label_distribution={choice!r}: allowed values are {list(LABEL_CHOICES)}")


def sampling_params(model: torch.nn.Module) -> int:
    """Parameters of the network that draws samples (DDPM ``net``, GAN ``generator``, VAE ``decoder``)."""
    for name in SAMPLING_NETS:
        net = getattr(model, name, None)
        if isinstance(net, torch.nn.Module):
            return sum(p.numel() for p in net.parameters())
    return sum(p.numel() for p in model.parameters())


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``rows`` (floats with 4 significant digits, missing values as ``–``)."""
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def result_row(result: dict[str, Any]) -> dict[str, Any]:
    """One flat table row from an :meth:`Evaluator.evaluate` result."""
    m = result["metrics"]
    row = {k: m.get(k) for k in ("fid", "kid", "kid_std", "is", "is_std", "precision", "recall", "class_coverage",
                                 "class_entropy", "cond_accuracy")}
    row["s/image"] = result["timing"]["sampling_seconds_per_image"]
    row["features img/s"] = result["timing"]["feature_images_per_sec"]
    return row


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path``; print a table, write ``metrics.json`` and log to the configured loggers."""
    tune_cpu_allocator()  # large CPU tensors reuse freed memory (atelier.utils.allocator)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.get("device", "auto"))
    model = load_module(cfg.ckpt_path, ema_sigma_rel=cfg.get("ema_sigma_rel")).to(device)
    datamodule = reference_datamodule(cfg.ckpt_path, cfg.get("data_dir"), cfg.get("reference_image_size"))
    extractor_cfg = OmegaConf.to_container(cfg.feature_extractor, resolve=True)
    evaluator = Evaluator(
        extractor_cfg, datamodule, list(cfg.metrics), int(cfg.num_samples), cfg.get("reference_split"),
        cfg.get("reference_size"), cfg.get("cache_dir"), cfg.get("kid_subset_size"), int(cfg.kid_subsets),
        int(cfg.is_splits), int(cfg.batch_size), int(cfg.seed), device, prc_k=int(cfg.get("prc_k", 3)),
        sample_image_size=cfg.get("sample_image_size"),
    )
    sample_kwargs: dict[str, Any] = {k: cfg.get(k) for k in ("sampler", "num_inference_steps", "guidance_scale",
                                                                     "sampling_prior")}
    sample_kwargs["guidance_interval"] = interval_option(cfg)
    sample_kwargs.update(autocast_kwargs(model, cfg.get("autocast")))
    sample_kwargs.update(guide_kwargs(model, cfg))
    classes = getattr(model, "num_classes", None)
    if isinstance(classes, int):  # conditional: labels as asked, and the classifier's conditional accuracy
        labels_from = label_choice(cfg)
        sample_kwargs["labels"] = evaluation_labels(labels_from, int(cfg.num_samples), classes, datamodule)
    try:
        result = evaluator.evaluate(model, sample_kwargs)
        if "guide" in sample_kwargs:
            result["protocol"]["sampling"]["guide"] = guide_choice(cfg)[0]
        if "labels" in sample_kwargs:
            result["protocol"]["sampling"]["label_distribution"] = labels_from
        result.update(ckpt_path=str(cfg.ckpt_path), model=type(model).__name__, params=sampling_params(model),
                      run_info=run_info(int(cfg.seed)))
        row = {"model": result["model"], "params": result["params"], **result_row(result)}
        columns = [c for c in row if row[c] is not None]
        table = format_table([row], columns)
        print(f"\n{table}\n\nprotocol:\n{evaluator.protocol(result['protocol']['sampling']).describe()}\n")
        if "class_histogram" in result["metrics"]:
            print(f"class histogram (predicted by the classifier): {result['metrics']['class_histogram']}")
        write_json(result, output_dir / "metrics.json")
        _log(cfg, result)
        log.info("metrics written to %s", output_dir / "metrics.json")
        return result
    finally:
        finish_wandb()


def _log(cfg: DictConfig, result: dict[str, Any]) -> None:
    loggers = instantiate_group(cfg.get("logger"))
    scalars = {f"eval/{k}": float(v) for k, v in result["metrics"].items() if isinstance(v, int | float)}
    scalars.update({f"eval/{k}": float(v) for k, v in result["timing"].items() if isinstance(v, int | float)})
    for logger in loggers:
        logger.log_hyperparams({"protocol": result["protocol"], "ckpt_path": result["ckpt_path"]})
        logger.log_metrics(scalars, step=0)
        logger.save()

