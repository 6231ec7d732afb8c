"""Preemption and time limits: on a signal, stop at the next step boundary, checkpoint, close W&B, hand over.

One owner of requeueing: **submitit** (through Hydra's submitit launcher). SLURM sends submitit's signal
(``SIGUSR2`` unless ``SUBMITIT_PREEMPT_SIGNAL`` names another) ``signal_delay_s`` before the time limit, and on a
preemption when the cluster sets ``SlurmctldParameters=preempt_send_user_signal``; submitit's handler then
re-pickles the Hydra job, runs ``scontrol requeue`` and exits with ``SystemExit``, so the interrupted attempt leaves
no result file and the submitting ``train.py -m`` keeps waiting for the requeued attempt. Lightning's own SLURM
auto-requeue is switched off by the train task (``SLURMEnvironment(auto_requeue=False)``), so two mechanisms never
both requeue.

What this callback adds is *when* and *what first*. A signal handler runs between two bytecodes, possibly in
the middle of an optimiser step, and a requeue makes SLURM send ``SIGTERM`` to every process of the job step,
wandb-core included (wandb issue 9963). So the handlers here only record the signal; at the next training-batch
boundary the callback saves ``<run dir>/checkpoints/last.ckpt``, marks the W&B run preempting and finishes it
while wandb-core is still alive, and only then calls submitit's handler (requeue and exit). Without submitit (a
plain run, a hand-written ``sbatch``) the warning signal checkpoints and stops the run with ``SystemExit``.

``SIGTERM`` (a preemption without warning, ``scontrol requeue``, ``scancel``) takes the same path and ends in
Lightning's ``SIGTERMException`` (a ``SystemExit``); SLURM itself requeues such a job when it was preempted or
requeued. wandb-core has received the same ``SIGTERM`` by then, so the run is re-attached through a fresh
wandb-core to be marked and finished (:func:`atelier.utils.loggers.finish_wandb_preempted`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from atelier.utils.loggers import finish_wandb_preempted

log = logging.getLogger(__name__)

#: what submitit reads to choose its signal (submitit.core.job_environment._PREEMPT_SIG_ENV)
SUBMITIT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"

Handler = Callable[[int, FrameType | None], Any] | int | None


@contextmanager
def _logging_off() -> Iterator[None]:
    """Every logger off for the duration (``logging.disable``), then back to the previous level."""
    level = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(level)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def warning_signal(name: str | None = None) -> signal.Signals:
    """The end-of-job warning signal: ``name`` (e.g. ``"USR2"`` or ``"SIGUSR1"``), else submitit's
    (``$SUBMITIT_PREEMPT_SIGNAL``, default ``USR2``).

    Raises:
        ValueError: ``name`` is not a signal of this platform (the message lists a few allowed names).
    """
    name = (name or os.environ.get(SUBMITIT_SIGNAL_ENV) or "USR2").upper()
    full = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return signal.Signals[full]
    except KeyError:
        raise ValueError(f"preemption signal {name!r} is not known; choose e.g. one of "
                         "['USR1', 'USR2', 'TERM', 'INT']") from None


def ignore_late_warning(signal_name: str | None = None) -> bool:
    """Under SLURM, ignore the end-of-job warning signal from now on (``SIG_IGN``); call once results are written.

    Why: SLURM may send the warning signal again at any moment of an attempt (up to a minute before its limit). If
    it arrives after the task has written its results, while submitit pickles them or the interpreter exits,
    there is nothing left to save: CPython's finalisation puts every handler it installed back to ``SIG_DFL``
    (``_PySignal_Fini``), so the signal's default action kills the finished job and SLURM records it FAILED. An
    ignored signal stays ignored through finalisation. Outside SLURM (no ``SLURM_JOB_ID``) and off the main
    thread nothing changes.

    Args:
        signal_name: the warning signal, as for :func:`warning_signal`.

    Returns:
        whether the signal is now ignored.
    """
    if "SLURM_JOB_ID" not in os.environ or not _on_main_thread():
        return False
    signal.signal(warning_signal(signal_name), signal.SIG_IGN)
    return True


class Preemption(Callback):
    """Checkpoint-then-hand-over on the warning signal or ``SIGTERM`` (see the module docstring).

    Args:
        signal_name: the warning signal (default: submitit's, ``USR2``).
        exit_code: the W&B exit code of a preempted attempt (non-zero: W&B shows it as preempted).

    Attributes:
        received: the signal that stopped this attempt, or ``None``.
    """

    def __init__(self, signal_name: str | None = None, exit_code: int = 1) -> None:
        self.signum = warning_signal(signal_name)
        self.exit_code = exit_code
        self.received: int | None = None
        self._previous: dict[int, Handler] = {}
        self._handled = False

    # ------------------------------------------------------------------ signal handlers: record only
    # Nothing here logs. A handler runs between two bytecodes of the main thread, possibly inside a logging
    # handler's write; SLURM sends SIGCONT and SIGTERM back to back, and a second handler writing to the same
    # buffered stream (train.log, stdout) makes ``io`` raise "reentrant call", which logging prints as a traceback.
    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if signum == signal.SIGTERM:
            previous = self._previous.get(signum)
            if callable(previous):  # Lightning's notifier (received_sigterm, DDP children) and submitit's bypass
                with _logging_off():  # both log "Received"/"Bypassing"; this callback logs at the step boundary
                    previous(signum, frame)

    @staticmethod
    def _continue(signum: int, frame: FrameType | None) -> None:
        """SIGCONT during training: nothing to do (submitit's handler would only log that it bypassed it)."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not _on_main_thread():  # signal.signal works in the main thread only
            return
        # after Lightning registered its own handlers (Trainer._run), which it restores at teardown
        for signum, handler in ((self.signum, self._record), (signal.SIGTERM, self._record),
                                (signal.SIGCONT, self._continue)):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, handler)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # before Lightning's signal connector restores its originals: a late USR2 (final sampling, evaluation)
        # reaches submitit again, which requeues; the requeued attempt resumes the finished training at once
        if not _on_main_thread():  # signal.signal works in the main thread only
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    # ------------------------------------------------------------------ step boundary: act
    def _pending(self, trainer: Trainer) -> bool:
        pending = self.received is not None and not self._handled
        if trainer.world_size > 1:  # every rank stops at the same step (srun signals all of them anyway)
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        return pending

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._pending(trainer):
            self._stop(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a signal during the last step: act on it here, the handlers are about to be restored
        if self.received is not None and not self._handled:
            self._stop(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # SIGTERM after this step's on_train_batch_end: Lightning raised its SIGTERMException at the end of the
        # same step, before this callback saw it (Lightning's ModelCheckpoint saved then too)
        if self.received is not None and not self._handled:
            self._handled = True
            self._save_and_close(trainer, signal.Signals(self.received).name)

    def _save_and_close(self, trainer: Trainer, name: str) -> None:
        log.warning("Received %s: checkpointing at global step %d", name, trainer.global_step)
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        log.warning("%s: saved %s at global step %d", name, path, trainer.global_step)
        if trainer.is_global_zero:
            init = next((lg._wandb_init for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
            if finish_wandb_preempted(init, exit_code=self.exit_code):
                log.info("W&B run marked preempted and finished")

    def _stop(self, trainer: Trainer) -> None:
        self._handled = True
        signum = self.received if self.received is not None else int(signal.SIGTERM)
        name = signal.Signals(signum).name
        self._save_and_close(trainer, name)
        if signum == self.signum:
            previous = self._previous.get(signum)
            if callable(previous):
                log.info("handing over to the previous %s handler (submitit: requeue and exit)", name)
                previous(signum, None)  # submitit: re-pickle the job, scontrol requeue, sys.exit(-1)
            raise SystemExit(128 + signum)
        raise SIGTERMException(128 + signum)
