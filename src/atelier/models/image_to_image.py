"""Shared parts of the image-to-image modules (feed-forward style transfer, AdaIN, restoration).

These models transform an input image rather than draw from noise, so they have no ``sample`` method: the
sample-grid callback shows their ``visualizations`` of a fixed batch of validation images instead, and
``stylize.py`` / ``restore.py`` apply a trained model to your own images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning import LightningModule
from torch import nn

from atelier.models.optim import OptimizerFactory, SchedulerFactory, optimizers_config


def images_of(batch: Any) -> torch.Tensor:
    """The image tensor of a batch that is either ``images`` or ``(images, labels, ...)``."""
    return batch[0] if isinstance(batch, list | tuple) else batch


class ImageToImageModule(LightningModule):
    """LightningModule base with the optimiser/LR-schedule plumbing shared by the image-to-image models.

    Args:
        optimizer: partial optimiser, called with :meth:`trainable_parameters`.
        lr_scheduler: optional partial (``diffusers.optimization.get_scheduler``), stepped every step.
    """

    def __init__(self, optimizer: OptimizerFactory, lr_scheduler: SchedulerFactory | None = None) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

    # ----------------------------------------------------------------- optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        return optimizers_config(self.trainer, self.trainable_parameters(), self.optimizer_factory,
                                 self.lr_scheduler_factory)

    def log_terms(self, terms: dict[str, torch.Tensor], stage: str, batch_size: int) -> torch.Tensor:
        """Log every loss term as ``<stage>/<name>`` (``<stage>/loss`` on the progress bar; synced across ranks
        outside training) and return ``terms["loss"]``."""
        sync = stage != "train"
        self.log_dict({f"{stage}/{k}": v for k, v in terms.items() if k != "loss"}, batch_size=batch_size,
                      sync_dist=sync)
        self.log(f"{stage}/loss", terms["loss"], prog_bar=True, batch_size=batch_size, sync_dist=sync)
        return terms["loss"]

    def step(self, batch: Any, stage: str) -> torch.Tensor:
        """The logged loss of one batch at ``stage`` (``train`` or ``val``); subclasses define it or override
        ``training_step`` / ``validation_step`` themselves."""
        raise NotImplementedError(f"{type(self).__name__} defines neither step() nor its own training_step")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.step(batch, "val")

    def in_eval_mode(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``fn`` with the module in eval mode and without gradients, restoring the previous mode."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return fn()
        finally:
            self.train(was_training)


def rows(*groups: torch.Tensor, per_row: int) -> torch.Tensor:
    """Stack image groups ``(N, C, H, W)`` (same N) as consecutive grid rows of ``per_row`` images each, in
    chunks: rows ``g1[0:k], g2[0:k], …, g1[k:2k], g2[k:2k], …`` with ``k = per_row``; 1-channel groups are
    repeated to 3 channels when any group has 3."""
    channels = max(g.shape[1] for g in groups)
    groups = tuple(g.float().cpu().expand(-1, channels, -1, -1) if g.shape[1] == 1 else g.float().cpu()
                   for g in groups)
    n = min(len(g) for g in groups) // per_row * per_row
    chunks = [g[start:start + per_row] for start in range(0, n, per_row) for g in groups]
    return torch.cat(chunks) if chunks else torch.cat([g[:0] for g in groups])
