"""Training speed and memory summary: images/s, model FLOPs utilisation and peak CUDA memory, printed and saved
as ``perf.json``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.utilities.throughput import get_available_flops
from torch.utils.flop_counter import FlopCounterMode

from atelier.utils.batch import batch_size

log = logging.getLogger(__name__)

#: dense bf16/fp16 tensor-core peaks (FLOP/s) for GPUs that Lightning's table lacks or lists by the sparse figure:
#: NVIDIA's H200 datasheet gives 1,979 TFLOPS "with sparsity", so 989.4 dense (the H100 SXM's).
DENSE_PEAKS = {"h200": 989.4e12}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's theoretical peak FLOP/s for the matmul dtype of ``precision`` (``bf16-mixed`` → bf16,
    ``16-mixed`` → fp16, else fp32/TF32): Lightning's table (``get_available_flops``), else :data:`DENSE_PEAKS`
    for bf16/fp16; ``None`` on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else torch.float32
    name = torch.cuda.get_device_name(device).lower()
    dense = next((v for k, v in DENSE_PEAKS.items() if k in name), None)
    if dense is not None and dtype in (torch.bfloat16, torch.float16):
        return dense
    flops = get_available_flops(device, dtype)
    return float(flops) if flops else None


class PerfSummary(Callback):
    """Measure training throughput after ``warmup_steps`` batches (compilation, cuDNN autotuning and data-loader
    start-up excluded) and the peak CUDA memory of the run; at the end of training log one line and write
    ``<dirpath>/perf.json`` (rank 0).

    Reported: ``images_per_s`` (all processes: this rank's images/s × world size, the ranks being in lockstep),
    ``batches_per_s`` (per process; a GAN batch is one D and one G step), ``peak_allocated_gib`` and
    ``peak_reserved_gib`` (``torch.cuda.max_memory_allocated/reserved`` of this rank's device, GiB; ``None`` on
    a CPU), ``measured_s`` (seconds timed) and ``batches`` (batches timed).

    Model FLOPs: the last warm-up batch runs under ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
    convolutions and attention of the forward and backward passes, as the batch really runs: no extra step, no RNG
    drawn), giving ``flops_per_batch`` and ``flops_per_image``; ``achieved_tflops`` = FLOPs per batch × batches/s
    per device, and ``mfu`` = that over :func:`peak_flops` (or ``peak_tflops``) for the run's precision (Chowdhery
    et al. 2022, PaLM, appendix B). The FLOPs are ``None`` for a compiled network, whose fused graph the counter
    does not see, and MFU is ``None`` on a CPU unless ``peak_tflops`` is given.

    Args:
        dirpath: folder for ``perf.json`` (the run directory).
        warmup_steps: batches not timed at the start (at least 1: the last one is counted for FLOPs).
        peak_tflops: the device's peak in TFLOP/s for the run's precision; ``None``: :func:`peak_flops`.
    """

    def __init__(self, dirpath: str | Path, warmup_steps: int = 20, peak_tflops: float | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.warmup_steps = max(1, int(warmup_steps))
        self.peak_tflops = peak_tflops
        self._seen = 0
        self._images = 0
        self._start: float | None = None
        self._end: float | None = None
        self._counter: FlopCounterMode | None = None
        self._flops: int | None = None
        self._flops_images = 0
        self.summary: dict[str, Any] = {}

    def _sync(self, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._seen == self.warmup_steps - 1 and self._flops is None and not _compiled(pl_module):
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
            self._flops_images = batch_size(batch)
        if self._seen == self.warmup_steps and self._start is None:
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._flops = int(self._counter.get_total_flops()) or None
            self._counter = None
        self._seen += 1
        if self._start is not None:
            self._images += batch_size(batch)
            self._sync(pl_module)
            self._end = time.perf_counter()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stop_counting()  # never leave the FLOP counter's dispatch mode on after a failed step

    def _stop_counting(self) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        timed = self._seen - self.warmup_steps
        seconds = (self._end - self._start) if self._start is not None and self._end is not None else 0.0
        cuda = pl_module.device.type == "cuda"
        gib = 1024**3
        self._stop_counting()  # training ended inside the counted batch
        batches_per_s = timed / seconds if seconds > 0 else None
        peak = self.peak_tflops * 1e12 if self.peak_tflops else peak_flops(pl_module.device, str(trainer.precision))
        achieved = self._flops * batches_per_s if self._flops and batches_per_s else None
        self.summary = {
            "images_per_s": round(self._images / seconds * trainer.world_size, 1) if seconds > 0 else None,
            "batches_per_s": round(timed / seconds, 2) if seconds > 0 else None,
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
            "device": torch.cuda.get_device_name(pl_module.device) if cuda else str(pl_module.device),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(pl_module.device) / gib, 3) if cuda else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(pl_module.device) / gib, 3) if cuda else None,
            "flops_per_batch": self._flops,
            "flops_per_image": round(self._flops / self._flops_images) if self._flops and self._flops_images else None,
            "achieved_tflops": float(f"{achieved / 1e12:.4g}") if achieved else None,
            "peak_tflops": round(peak / 1e12, 1) if peak else None,
            "mfu": float(f"{achieved / peak:.4g}") if achieved and peak else None,
            "measured_s": round(seconds, 1),
            "batches": max(timed, 0),
            "warmup_steps": self.warmup_steps,
        }
        if trainer.is_global_zero:
            log.info("perf: %s", ", ".join(f"{k}={v}" for k, v in self.summary.items()))
            self.dirpath.mkdir(parents=True, exist_ok=True)
            (self.dirpath / "perf.json").write_text(json.dumps(self.summary, indent=2))


def _compiled(pl_module: LightningModule) -> bool:
    """Whether the module trains a ``torch.compile``'d network (``hparams.compile``, as Atelier's DDPM sets it)."""
    hparams = getattr(pl_module, "hparams", {}) or {}
    return bool(hparams.get("compile", False))
