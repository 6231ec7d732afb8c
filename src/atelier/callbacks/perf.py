"""Training speed and memory summary: images/s and peak CUDA memory, printed and saved as ``perf.json``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from atelier.utils.batch import batch_size

log = logging.getLogger(__name__)


class PerfSummary(Callback):
    """Measure training throughput after ``warmup_steps`` batches (compilation, cuDNN autotuning and data-loader
    start-up excluded) and the peak CUDA memory of the run; at the end of training log one line and write
    ``<dirpath>/perf.json`` (rank 0).

    Reported: ``images_per_s`` (all processes: this rank's images/s × world size, the ranks being in lockstep),
    ``batches_per_s`` (per process; a GAN batch is one D and one G step), ``peak_allocated_gib`` and
    ``peak_reserved_gib`` (``torch.cuda.max_memory_allocated/reserved`` of this rank's device, GiB; ``None`` on
    a CPU), ``measured_s`` (seconds timed) and ``batches`` (batches timed).

    Args:
        dirpath: folder for ``perf.json`` (the run directory).
        warmup_steps: batches not timed at the start.
    """

    def __init__(self, dirpath: str | Path, warmup_steps: int = 20) -> None:
        self.dirpath = Path(dirpath)
        self.warmup_steps = warmup_steps
        self._seen = 0
        self._images = 0
        self._start: float | None = None
        self._end: float | None = None
        self.summary: dict[str, Any] = {}

    def _sync(self, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._seen == self.warmup_steps and self._start is None:
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._seen += 1
        if self._start is not None:
            self._images += batch_size(batch)
            self._sync(pl_module)
            self._end = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        timed = self._seen - self.warmup_steps
        seconds = (self._end - self._start) if self._start is not None and self._end is not None else 0.0
        cuda = pl_module.device.type == "cuda"
        gib = 1024**3
        self.summary = {
            "images_per_s": round(self._images / seconds * trainer.world_size, 1) if seconds > 0 else None,
            "batches_per_s": round(timed / seconds, 2) if seconds > 0 else None,
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
            "device": torch.cuda.get_device_name(pl_module.device) if cuda else str(pl_module.device),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(pl_module.device) / gib, 3) if cuda else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(pl_module.device) / gib, 3) if cuda else None,
            "measured_s": round(seconds, 1),
            "batches": max(timed, 0),
            "warmup_steps": self.warmup_steps,
        }
        if trainer.is_global_zero:
            log.info("perf: %s", ", ".join(f"{k}={v}" for k, v in self.summary.items()))
            self.dirpath.mkdir(parents=True, exist_ok=True)
            (self.dirpath / "perf.json").write_text(json.dumps(self.summary, indent=2))
