"""Optimiser and per-step LR schedule from the partials in a model config (shared by the single-optimiser
modules: DDPM, VAE, the image-to-image models)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning import Trainer
from torch import nn

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def optimizers_config(
    trainer: Trainer,
    params: Iterable[nn.Parameter],
    optimizer: OptimizerFactory,
    lr_scheduler: SchedulerFactory | None = None,
) -> Any:
    """What ``LightningModule.configure_optimizers`` returns: the optimiser over ``params`` and, when
    ``lr_scheduler`` is given, that schedule stepped every optimiser step (logged as ``lr``).

    ``lr_scheduler`` is called as ``lr_scheduler(optimizer=..., num_training_steps=...)`` (e.g.
    ``diffusers.optimization.get_scheduler`` with ``name`` and ``num_warmup_steps``), the number of steps being
    ``trainer.estimated_stepping_batches``.

    Raises:
        ValueError: when a schedule is asked for but the training length is unbounded (no max_steps/max_epochs).
    """
    opt = optimizer(params)
    if lr_scheduler is None:
        return opt
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError("an LR schedule needs a finite training length: set trainer.max_steps or max_epochs")
    scheduler = lr_scheduler(optimizer=opt, num_training_steps=int(total))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}
