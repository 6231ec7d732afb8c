"""Global batch size → per-device micro batch and gradient accumulation (``global_batch_size`` in train.yaml)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batching:
    """How one optimiser step's images are split: ``micro_batch_size`` images per device per forward pass,
    ``accumulate_grad_batches`` passes per step, on ``world_size`` processes (devices × nodes)."""

    global_batch_size: int
    world_size: int
    micro_batch_size: int
    accumulate_grad_batches: int


def world_size(devices: int | str | Sequence[int] | None, num_nodes: int = 1, accelerator: str | None = None) -> int:
    """Number of training processes Lightning will run for ``trainer.devices`` × ``trainer.num_nodes``.

    ``devices`` may be a count, a list of device indices, or ``-1``/``"auto"`` (all visible GPUs; on a CPU or
    when no GPU is visible, 1 process, as Lightning does). Under SLURM with processes started by ``srun``,
    ``SLURM_NTASKS`` is the truth and wins.

    Raises:
        ValueError: ``devices`` or ``num_nodes`` is not a positive count (names the key and the allowed values).
    """
    if "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return int(os.environ["SLURM_NTASKS"])
    if not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"trainer.num_nodes={num_nodes!r} is not allowed; use a positive integer")
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        per_node = len(devices)
    elif devices in (-1, "-1", "auto", None):
        per_node = 1
        if accelerator in (None, "auto", "gpu", "cuda"):
            import torch

            per_node = max(1, torch.cuda.device_count())
    else:
        try:
            per_node = int(devices)
        except (TypeError, ValueError):
            per_node = 0
        if per_node < 1:
            raise ValueError(f"trainer.devices={devices!r} is not allowed; use a positive integer, a list of "
                             "device indices, -1 or 'auto'")
    return per_node * num_nodes


def derive_batching(global_batch_size: int, world: int, micro_batch_size: int | None = None) -> Batching:
    """Split ``global_batch_size`` images per optimiser step over ``world`` processes.

    Each process gets ``global_batch_size / world`` images per step; with ``micro_batch_size`` (the most images
    one device can take in a forward pass) that share is accumulated over ``share / micro_batch_size`` passes,
    otherwise it is one pass.

    Raises:
        ValueError: a non-positive size, ``global_batch_size`` not divisible by ``world``, or the per-device
            share not divisible by ``micro_batch_size`` (the message names the keys and the valid choices).
    """
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size!r} is not allowed; use a positive integer or null")
    if world < 1:
        raise ValueError(f"world size {world} (trainer.devices × trainer.num_nodes) must be ≥ 1")
    if global_batch_size % world:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by trainer.devices × "
                         f"trainer.num_nodes = {world}; use a multiple of {world}")
    share = global_batch_size // world
    if micro_batch_size is None:
        return Batching(global_batch_size, world, share, 1)
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size!r} is not allowed; use a positive integer or null")
    if share % micro_batch_size:
        divisors = [d for d in range(1, share + 1) if share % d == 0]
        raise ValueError(f"global_batch_size={global_batch_size} over {world} process(es) is {share} images per "
                         f"device, not divisible by micro_batch_size={micro_batch_size}; choose one of {divisors}")
    return Batching(global_batch_size, world, micro_batch_size, share // micro_batch_size)


def apply_global_batch_size(cfg: DictConfig) -> Batching | None:
    """When ``cfg.global_batch_size`` is set, write the derived ``data.batch_size`` (per device, per forward pass)
    and ``trainer.accumulate_grad_batches`` into ``cfg`` (in place) and return the split; else ``None``.

    ``micro_batch_size`` (optional) caps the images per device per pass; the rest is gradient accumulation.

    Raises:
        ValueError: as :func:`derive_batching` and :func:`world_size`.
    """
    if cfg.get("global_batch_size") is None:
        return None
    trainer = cfg.trainer
    world = world_size(trainer.get("devices", 1), trainer.get("num_nodes", 1), trainer.get("accelerator"))
    split = derive_batching(cfg.global_batch_size, world, cfg.get("micro_batch_size"))
    with open_dict(cfg):
        cfg.data.batch_size = split.micro_batch_size
        cfg.trainer.accumulate_grad_batches = split.accumulate_grad_batches
    log.info("global_batch_size=%d = %d process(es) x data.batch_size=%d x accumulate_grad_batches=%d",
             split.global_batch_size, split.world_size, split.micro_batch_size, split.accumulate_grad_batches)
    return split
