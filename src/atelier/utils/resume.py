"""Find a run's own newest checkpoint (auto-resume after a crash, ``kill -9``, preemption or SLURM requeue)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

RESUME_MODES = ("auto", "never")


def checkpoint_candidates(output_dir: str | Path) -> list[Path]:
    """Checkpoints a run directory can resume from, newest first (by modification time).

    ``checkpoints/*.ckpt`` (``last.ckpt`` and the periodic ones, ModelCheckpoint's exception checkpoint) and
    ``hpc_ckpt_*.ckpt`` (what Lightning's SLURM auto-requeue saves into ``trainer.default_root_dir``).
    """
    out = Path(output_dir)
    found = [*out.glob("checkpoints/*.ckpt"), *out.glob("hpc_ckpt_*.ckpt")]
    return sorted((p for p in found if p.is_file()), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def checkpoint_step(path: str | Path) -> int | None:
    """``global_step`` stored in a Lightning checkpoint, or ``None`` when the file is unreadable (e.g. cut short
    by a ``kill -9`` while it was being written). Memory-maps the file, so large checkpoints are cheap."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["global_step"])
    except Exception as err:  # truncated zip, missing key, ...
        log.warning("checkpoint %s is unreadable (%s: %s); skipped", path, type(err).__name__, err)
        return None


def resolve_ckpt_path(ckpt_path: str | None, resume: str, output_dir: str | Path) -> tuple[str | None, int | None]:
    """The checkpoint to start from and its global step.

    An explicit ``ckpt_path`` always wins. Otherwise, with ``resume="auto"``, the run's own newest readable
    checkpoint in ``output_dir`` (see :func:`checkpoint_candidates`), so that a relaunch into the same directory
    (``hydra.run.dir=...``, a requeued SLURM/submitit job) continues where it stopped; ``None`` in a fresh
    directory. ``resume="never"`` always starts from scratch.

    Raises:
        ValueError: ``resume`` is not one of :data:`RESUME_MODES`.
    """
    if resume not in RESUME_MODES:
        raise ValueError(f"resume={resume!r} is not allowed; choose one of {list(RESUME_MODES)}")
    if ckpt_path:
        return str(ckpt_path), None
    if resume == "never":
        return None, None
    for path in checkpoint_candidates(output_dir):
        step = checkpoint_step(path)
        if step is not None:
            return str(path), step
    return None, None
