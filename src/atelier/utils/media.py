"""Log the images and numbers of a non-training task (stylize, restore) to the configured loggers (W&B)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from atelier.utils.config import instantiate_group
from atelier.utils.loggers import finish_wandb

log = logging.getLogger(__name__)


def log_task_results(cfg: DictConfig, images: Mapping[str, str | Path], metrics: Mapping[str, float]) -> None:
    """Instantiate ``cfg.logger`` (e.g. ``wandb``: online with credentials, offline otherwise), log the resolved
    config, ``metrics`` and the PNG files of ``images`` (key → path), then close the W&B run.

    Loggers other than W&B get the config and metrics only. Nothing happens when ``cfg.logger`` is empty.
    """
    loggers: list[Logger] = instantiate_group(cfg.get("logger"))
    if not loggers:
        return
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        for logger in loggers:
            logger.log_hyperparams(resolved)
            if metrics:
                logger.log_metrics(dict(metrics), step=0)
            if isinstance(logger, WandbLogger):
                for key, path in images.items():
                    logger.log_image(key=key, images=[str(path)], step=0)
            logger.save()
            logger.finalize("success")
    finally:
        finish_wandb()

