"""Fixed-noise sample grids during training: PNG under ``samples/`` and an image in W&B / TensorBoard."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

log = logging.getLogger(__name__)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save ``(N, C, H, W)`` images in ``[-1, 1]`` as one PNG grid (``nrow`` per row, default ≈ √N)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, round(images.shape[0] ** 0.5))
    save_image((images.detach().float().cpu() + 1) / 2, path, nrow=nrow, padding=2, pad_value=1.0)
    return path


class SampleGrid(Callback):
    """Every ``every_n_steps`` optimiser steps and at the end of training, draw ``num_samples`` images from
    ``pl_module.sample(n, generator=...)`` with the same seed, save ``step_XXXXXXX.png`` under ``dirpath`` and
    log it to W&B (key ``samples``) and TensorBoard. Runs on rank zero only.

    Args:
        dirpath: folder for the PNG grids.
        every_n_steps: interval in optimiser steps (0 disables periodic grids).
        num_samples: images per grid.
        seed: seed of the fixed noise.
        sample_kwargs: extra keyword arguments for ``sample`` (e.g. ``sampler``, ``num_inference_steps``).
        on_train_end: also draw a final grid (``final.png``).
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 1000,
        num_samples: int = 64,
        seed: int = 0,
        sample_kwargs: dict[str, Any] | None = None,
        on_train_end: bool = True,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        self.sample_kwargs = dict(sample_kwargs or {})
        self.final = on_train_end
        self._last_step = -1
        self.paths: list[Path] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.draw(trainer, pl_module, f"step_{step:07d}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.final and not trainer.sanity_checking:
            self.draw(trainer, pl_module, "final")

    @rank_zero_only
    def draw(self, trainer: Trainer, pl_module: LightningModule, name: str) -> Path:
        if not hasattr(pl_module, "sample"):
            raise TypeError(f"{type(pl_module).__name__} has no sample(n, generator) method for SampleGrid")
        generator = torch.Generator().manual_seed(self.seed)
        images = pl_module.sample(self.num_samples, generator=generator, **self.sample_kwargs)
        path = save_grid(images, self.dirpath / f"{name}.png")
        self.paths.append(path)
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], caption=[f"step {step}"], step=step)
            elif isinstance(logger, TensorBoardLogger):
                grid = make_grid((images.cpu() + 1) / 2, nrow=max(1, round(len(images) ** 0.5)))
                logger.experiment.add_image("samples", grid, global_step=step)
        log.info("sample grid saved: %s", path)
        return path
