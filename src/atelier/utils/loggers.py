"""Logger factories: W&B online when credentials exist, offline otherwise (``WANDB_MODE`` wins)."""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def wandb_credentials_present() -> bool:
    """True when ``WANDB_API_KEY`` is set or ``~/.netrc`` has an entry for the W&B API host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> str:
    """``WANDB_MODE`` when set (``online``, ``offline``, ``disabled``), else online iff credentials exist."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if wandb_credentials_present() else "offline"


def run_id(output_dir: str | Path) -> str:
    """Deterministic W&B run id of a run directory: 16 hex digits of the SHA-1 of its absolute path.

    The directory is what identifies a run in Atelier: a requeued SLURM/submitit job, or a relaunch into the same
    ``hydra.run.dir`` after a crash, runs in the same directory and so continues the same W&B run, while every
    new run (new timestamped directory) and every multirun job (own subdirectory) gets its own.
    """
    return hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]


def wandb_logger(save_dir: str, project: str = "atelier", id: str | None = None, resume: str = "allow",
                 **kwargs: Any) -> WandbLogger:
    """A Lightning ``WandbLogger`` writing under ``save_dir/wandb``, online or offline as :func:`wandb_mode` says.

    ``id`` defaults to ``$WANDB_RUN_ID`` when set (a W&B sweep agent sets it: the run must be the agent's), else
    to :func:`run_id` of ``save_dir`` (the run directory), with ``resume="allow"``: a run that restarts in its own
    directory (auto-resume, SLURM requeue) continues its W&B run instead of opening a new one. In offline mode it
    logs the one command that uploads the run later (``wandb sync <run dir>``).
    """
    mode = wandb_mode()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if mode == "disabled":
        kwargs["mode"] = "disabled"
    run = id or os.environ.get("WANDB_RUN_ID") or run_id(save_dir)
    logger = WandbLogger(save_dir=save_dir, project=project, offline=mode == "offline", id=run, resume=resume,
                         **kwargs)
    if mode == "offline":
        log.info("W&B runs offline (no credentials). To upload later: wandb sync %s/wandb/offline-run-*", save_dir)
    return logger


def finish_wandb() -> None:
    """Close the active W&B run, if any (so each task, and each multirun job, gets its own run)."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
