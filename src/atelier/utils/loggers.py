"""Logger factories: W&B online when credentials exist, offline otherwise (``WANDB_MODE`` wins)."""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
from collections.abc import Mapping
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


class ResilientWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger``, except that a wandb-core that died mid-run stops W&B logging instead of the
    training.

    A SLURM ``SIGTERM`` (preemption without warning, ``scontrol requeue``) reaches every process of the job step:
    wandb-core exits at once (wandb issue 9963) while the training process is still finishing its step, and the
    next ``log_metrics`` would raise ``ConnectionResetError`` and fail the job instead of letting it checkpoint and
    be requeued. Here the first such error is logged once and later metrics are dropped (the CSV logger keeps
    them); :mod:`atelier.callbacks.preemption` then re-attaches the run to mark it preempted.
    """

    core_lost: bool = False

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.core_lost:
            return
        try:
            super().log_metrics(metrics, step)
        except OSError as err:  # ConnectionResetError, BrokenPipeError: wandb-core is gone
            self.core_lost = True
            log.warning("W&B logging stopped: wandb-core is gone (%s: %s); the CSV log continues",
                        type(err).__name__, err)


def wandb_logger(save_dir: str, project: str = "atelier", id: str | None = None, resume: str = "allow",
                 **kwargs: Any) -> ResilientWandbLogger:
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
    logger = ResilientWandbLogger(save_dir=save_dir, project=project, offline=mode == "offline", id=run,
                                  resume=resume, **kwargs)
    if mode == "offline":
        log.info("W&B runs offline (no credentials). To upload later: wandb sync %s/wandb/offline-run-*", save_dir)
    return logger


def finish_wandb(exit_code: int | None = None) -> None:
    """Close the active W&B run, if any (so each task, and each multirun job, gets its own run). Never raises.

    Called from ``finally:`` blocks, so it must not replace an exception in flight (a preemption's
    ``SystemExit``, a ``KeyboardInterrupt``): when wandb-core is already gone (a SLURM ``SIGTERM`` reaches every
    process of the job step, wandb-core included: wandb issue 9963) ``wandb.finish()`` raises
    ``ConnectionResetError``, and a signal that interrupted ``import wandb`` leaves a half-initialised module whose
    attributes raise ``AttributeError``; any such error is logged and swallowed here.
    """
    try:
        import wandb

        if getattr(wandb, "run", None) is None:
            return
        wandb.finish(exit_code=exit_code)
    except ImportError:
        return
    except Exception as err:  # wandb-core gone (ConnectionResetError, BrokenPipeError), a half-imported wandb, ...
        log.warning("W&B run could not be finished (%s: %s); wandb-core is gone", type(err).__name__, err)
        try:
            _forget_wandb()
        except Exception as again:
            log.debug("could not drop the W&B handle: %s: %s", type(again).__name__, again)


def _forget_wandb() -> None:
    """Drop the Python side's handle on a dead wandb-core, so that a later ``wandb.init`` starts a new one."""
    import wandb

    try:
        wandb.teardown()
    except Exception as err:
        log.debug("wandb.teardown() after a dead wandb-core: %s: %s", type(err).__name__, err)
    wandb.run = None


def finish_wandb_preempted(init_kwargs: dict[str, Any] | None, exit_code: int = 1) -> bool:
    """Mark the active W&B run as preempting (``run.mark_preempting()``) and finish it with ``exit_code``.

    W&B shows a run that was marked preempting and then exits non-zero as *preempted* (not crashed or failed);
    the requeued attempt continues it (same run id, ``resume="allow"``). If wandb-core was killed with the job
    step (a preemption without warning: SLURM's ``SIGTERM`` goes to every process of the step), the run is
    re-attached through a fresh wandb-core with ``init_kwargs`` (the logger's own ``wandb.init`` arguments: same
    id, project, directory), marked and finished there; records the killed core had not yet written are lost.
    Never raises.

    Returns:
        True when the run was marked and finished (directly or re-attached), False otherwise (no run, no
        ``init_kwargs`` to re-attach with, or W&B failing again).
    """
    try:
        import wandb

        active = wandb.run
    except Exception:  # not installed, or half-imported (a signal during `import wandb`)
        return False
    if active is None and not init_kwargs:
        return False
    if active is not None:
        try:
            wandb.run.mark_preempting()
            wandb.finish(exit_code=exit_code)
            _stop_service()
            return True
        except Exception as err:
            log.warning("wandb-core is gone (%s: %s): re-attaching the run to mark it preempted",
                        type(err).__name__, err)
            _forget_wandb()
    if not init_kwargs:
        return False
    try:
        kwargs = {k: v for k, v in init_kwargs.items() if k not in ("resume", "reinit")}
        run = wandb.init(**kwargs, resume="allow")
        run.mark_preempting()
        wandb.finish(exit_code=exit_code)
        _stop_service()
        return True
    except Exception as err:
        log.warning("W&B run could not be re-attached (%s: %s)", type(err).__name__, err)
        return False


def _stop_service() -> None:
    """Shut wandb-core down now, while it is alive: the requeue that follows sends SIGTERM to the job step, and a
    wandb-core killed then makes W&B's own exit hook print a traceback."""
    import wandb

    try:
        wandb.teardown()
    except Exception as err:
        log.debug("wandb.teardown(): %s: %s", type(err).__name__, err)
