"""One log line, early in a CPU run, with the measured speed and what an epoch and the whole run will take.

The default models (e.g. ``python train.py model=ddpm data=mnist``: a UNet of 64/128/256 channels with attention)
are sized for GPUs; on a laptop CPU they settle in for days without a word. After a few timed steps this callback
says how long, and points to the quick CPU experiment of the model family.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Timer

from atelier.callbacks.time_budget import TimeBudget

log = logging.getLogger(__name__)

#: model class name → the quick CPU experiment of that family (``configs/experiment/``)
QUICK_EXPERIMENTS: dict[str, str] = {"DDPM": "ddpm_mnist_cpu", "GAN": "gan_mnist_cpu", "VAE": "vae_mnist_cpu"}


def format_seconds(seconds: float) -> str:
    """``"2 d 3 h"``, ``"1 h 43 min"``, ``"12 min 5 s"`` or ``"40 s"``."""
    if not math.isfinite(seconds):
        return "unbounded"
    s = round(seconds)
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


class CPUTimeEstimate(Callback):
    """Time ``measure_steps`` training batches after ``skip_steps`` on a CPU run, then log one line: steps/s, the
    expected time per epoch and for the whole run (``max_steps`` / ``max_epochs`` / ``max_time``, whichever ends
    first), and, when an epoch takes longer than ``hint_after_s``, the quick CPU experiment of the model family.

    Silent on GPUs and other accelerators, and in runs with a :class:`~atelier.callbacks.time_budget.TimeBudget`
    (the quick experiments: their length is already time).

    Args:
        skip_steps: batches not timed (start-up, first-call compilation, data-loader warm-up).
        measure_steps: batches timed.
        hint_after_s: seconds per epoch above which the line names the quick experiment.
        quick_experiments: model class name → experiment name (default :data:`QUICK_EXPERIMENTS`).

    Attributes:
        estimate: after the measurement, ``{"steps_per_s", "epoch_s", "run_s", "steps_per_epoch"}``.
    """

    def __init__(self, skip_steps: int = 3, measure_steps: int = 10, hint_after_s: float = 600.0,
                 quick_experiments: Mapping[str, str] | None = None) -> None:
        if skip_steps < 0 or measure_steps < 1:
            raise ValueError(f"skip_steps must be ≥ 0 and measure_steps ≥ 1, got {skip_steps} and {measure_steps}")
        self.skip_steps, self.measure_steps = skip_steps, measure_steps
        self.hint_after_s = float(hint_after_s)
        self.quick_experiments = dict(QUICK_EXPERIMENTS if quick_experiments is None else quick_experiments)
        self.estimate: dict[str, float] | None = None
        self._batches = 0
        self._start: float | None = None
        self._active = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        on_cpu = pl_module.device.type == "cpu"
        self._active = on_cpu and not any(isinstance(cb, TimeBudget) for cb in trainer.callbacks)
        self._batches, self._start, self.estimate = 0, None, None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._active and self._batches == self.skip_steps:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._active:
            return
        self._batches += 1
        if self._batches == self.skip_steps + self.measure_steps and self._start is not None:
            self._report(trainer, pl_module, self.measure_steps / max(time.perf_counter() - self._start, 1e-9))
            self._active = False

    def _report(self, trainer: Trainer, pl_module: LightningModule, batches_per_s: float) -> None:
        per_epoch = trainer.num_training_batches
        epoch_s = per_epoch / batches_per_s if math.isfinite(per_epoch) else math.inf
        # optimiser steps per batch: Lightning counts each optimiser's step (a GAN's D and G)
        steps_per_batch = max(1, trainer.global_step) / max(1, self._batches)
        limits = []
        if trainer.max_steps and trainer.max_steps > 0:
            limits.append(trainer.max_steps / steps_per_batch / batches_per_s)
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            limits.append(trainer.max_epochs * epoch_s)
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
        if timer is not None and getattr(timer, "_duration", None):  # trainer.max_time
            limits.append(float(timer._duration))
        run_s = min(limits) if limits else math.inf
        self.estimate = {"steps_per_s": batches_per_s, "epoch_s": epoch_s, "run_s": run_s,
                         "steps_per_epoch": float(per_epoch)}
        line = (f"CPU training at {batches_per_s:.2f} batches/s (measured over {self.measure_steps} batches): "
                f"one epoch of {per_epoch} batches ≈ {format_seconds(epoch_s)}, this run ≈ {format_seconds(run_s)}")
        quick = self.quick_experiments.get(type(pl_module).__name__)
        if quick and epoch_s > self.hint_after_s:
            line += (f". This model is sized for a GPU; for a run of about 20 minutes on a CPU use "
                     f"experiment={quick} (docs/time_budget.md)")
        if epoch_s > self.hint_after_s:
            log.warning(line)
        else:
            log.info(line)
