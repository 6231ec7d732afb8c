"""Fixed-noise sample grids during training: PNG under ``samples/`` and an image in W&B / TensorBoard.

Works for every generative module through the sampling contract of :mod:`atelier.sampling.interface`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from atelier.callbacks.every_n import EveryNSteps
from atelier.sampling.interface import accepted_kwargs
from atelier.sampling.loop import autocast_kwargs

log = logging.getLogger(__name__)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save ``(N, C, H, W)`` images in ``[-1, 1]`` as one PNG grid (``nrow`` per row, default ≈ √N)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, round(images.shape[0] ** 0.5))
    save_image((images.detach().float().cpu() + 1) / 2, path, nrow=nrow, padding=2, pad_value=1.0)
    return path


def class_rows(model: Any, n: int) -> int | None:
    """Images per grid row that put one class per row for a conditional ``model``; ``None`` (the square default)
    for an unconditional one, and for one with so many classes (e.g. 100 k-means clusters) that a row per class
    would be narrower than half the square grid: its consecutive classes then fill the rows of a square grid."""
    classes = getattr(model, "num_classes", None)
    if not isinstance(classes, int) or classes <= 0:
        return None
    per_class = math.ceil(n / classes)
    return per_class if per_class >= round(n ** 0.5) / 2 else None


class SampleGrid(Callback):
    """Every ``every_n_steps`` optimiser steps and at the end of training, draw ``num_samples`` images from
    ``pl_module.sample(n, generator=...)`` with the same seed, save ``step_XXXXXXX.png`` under ``dirpath`` and
    log it to W&B (key ``samples``) and TensorBoard. Runs on rank zero only. For class-conditional modules
    (an integer ``num_classes`` attribute) the grid has ``ceil(num_samples / num_classes)`` images per row, and
    the modules' default labels put one class on each row (with many classes, a square grid: :func:`class_rows`).

    When the module has ``visualizations(generator, images)`` (GAN, VAE, the image-to-image models), its extra
    grids (latent interpolations, reconstructions, restorations or stylisations of a fixed batch of validation
    images) are saved beside it as ``<name>_step_XXXXXXX.png`` and logged under their own key. Image-to-image
    modules (style transfer, restoration) have no ``sample``: they get only those grids.

    A module with neither (a classifier) has, by that declaration, no grid to draw: the callback logs one info
    line saying so and draws nothing, so the default callbacks work for every model.

    Args:
        dirpath: folder for the PNG grids.
        every_n_steps: interval in optimiser steps (0 disables periodic grids).
        num_samples: images per grid.
        seed: seed of the fixed noise.
        sample_kwargs: extra keyword arguments for ``sample`` (e.g. ``sampler``, ``num_inference_steps``); the
            ones the module's ``sample`` does not take are dropped with a warning.
        on_train_end: also draw a final grid (``final.png``).
        autocast: for modules whose ``sample`` takes ``autocast`` (DDPM): run the network under bf16 autocast
            where that pays on the module's device, by the same rule as ``sample.py`` and ``evaluate.py``
            (:func:`atelier.sampling.loop.bf16_sampling`); ``False``: fp32. An ``autocast`` in ``sample_kwargs``
            wins.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 1000,
        num_samples: int = 64,
        seed: int = 0,
        sample_kwargs: dict[str, Any] | None = None,
        on_train_end: bool = True,
        autocast: bool = True,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.num_samples = num_samples
        self.seed = seed
        self.sample_kwargs = dict(sample_kwargs or {})
        self.final = on_train_end
        self.autocast = autocast
        self._every = EveryNSteps(every_n_steps)
        self.paths: list[Path] = []
        self._reference: torch.Tensor | None = None
        self._told_no_grid = False

    @property
    def every_n_steps(self) -> int:
        """The interval in optimiser steps (``<= 0``: off); held by the :class:`EveryNSteps` that decides."""
        return self._every.n

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self.has_grid(pl_module)

    def has_grid(self, pl_module: LightningModule) -> bool:
        """True when ``pl_module`` has ``sample`` or ``visualizations``; otherwise says once (info) that no grids
        are drawn for it."""
        if callable(getattr(pl_module, "sample", None)) or callable(getattr(pl_module, "visualizations", None)):
            return True
        if not self._told_no_grid:
            self._told_no_grid = True
            log.info("SampleGrid: %s has neither sample(n, generator) nor visualizations(); no sample grids are "
                     "drawn for it", type(pl_module).__name__)
        return False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self._every.fire(step):
            self.draw(trainer, pl_module, f"step_{step:07d}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.final and not trainer.sanity_checking:
            self.draw(trainer, pl_module, "final")

    def reference_images(self, trainer: Trainer) -> torch.Tensor | None:
        """The first ``num_samples`` (at most 16) validation images, fetched once; ``None`` without a datamodule."""
        if self._reference is None:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is None:
                return None
            loader = datamodule.val_dataloader() if getattr(datamodule, "val_set", True) is not None else None
            if loader is None:
                return None
            batch = next(iter(loader))
            images = batch[0] if isinstance(batch, list | tuple) else batch
            self._reference = images[: min(16, self.num_samples)]
        return self._reference

    @rank_zero_only
    def draw(self, trainer: Trainer, pl_module: LightningModule, name: str) -> list[Path]:
        """Save (and log) the grids of this step; returns their paths (none for a module with neither ``sample``
        nor ``visualizations``, which is said once in the log)."""
        if not self.has_grid(pl_module):
            return []
        has_sample = callable(getattr(pl_module, "sample", None))
        has_vis = callable(getattr(pl_module, "visualizations", None))
        paths = []
        if has_sample:
            kwargs = accepted_kwargs(pl_module, self.sample_kwargs)
            if "autocast" not in kwargs:
                kwargs.update(autocast_kwargs(pl_module, self.autocast))
            generator = torch.Generator().manual_seed(self.seed)
            images = pl_module.sample(self.num_samples, generator=generator, **kwargs)
            paths.append(self._save_and_log(trainer, images, name, "samples", class_rows(pl_module, len(images))))
        if has_vis:
            generator = torch.Generator().manual_seed(self.seed + 1)
            extra = pl_module.visualizations(generator, self.reference_images(trainer))
            for key, (grid_images, nrow) in extra.items():
                paths.append(self._save_and_log(trainer, grid_images, f"{key}_{name}", key, nrow))
        return paths

    def _save_and_log(self, trainer: Trainer, images: torch.Tensor, name: str, key: str, nrow: int | None) -> Path:
        path = save_grid(images, self.dirpath / f"{name}.png", nrow=nrow)
        self.paths.append(path)
        step = trainer.global_step
        nrow = nrow or max(1, round(len(images) ** 0.5))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[str(path)], caption=[f"step {step}"], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(key, make_grid((images.cpu() + 1) / 2, nrow=nrow), global_step=step)
        log.info("%s grid saved: %s", key, path)
        return path
