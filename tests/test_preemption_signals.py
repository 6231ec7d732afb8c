"""The Preemption callback's signal handlers: they record, never log (a handler that logs while the main thread
is inside the same stream's write makes ``io`` raise "reentrant call"), and teardown puts back what was there."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import pytest

from atelier.callbacks.preemption import Preemption


def test_handlers_record_without_logging_and_call_the_previous_sigterm_handler(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:  # Lightning's notifier and submitit's bypass log
        logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").warning("Received SIGTERM")
        calls.append(signum)

    callback = Preemption()
    callback._previous[signal.SIGTERM] = previous
    with caplog.at_level(logging.DEBUG):
        callback._record(signal.SIGTERM, None)
        callback._record(signal.SIGUSR2, None)
        Preemption._continue(signal.SIGCONT, None)
    assert caplog.records == []
    assert calls == [signal.SIGTERM]
    assert callback.received == signal.SIGTERM  # the first signal wins
    # logging is back on afterwards
    with caplog.at_level(logging.INFO):
        logging.getLogger("atelier").info("after")
    assert [r.getMessage() for r in caplog.records] == ["after"]


def test_teardown_restores_the_handlers_it_replaced() -> None:
    def usr2(signum: int, frame: FrameType | None) -> None: ...

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGCONT)}
    signal.signal(signal.SIGUSR2, usr2)
    try:
        callback = Preemption(signal_name="USR2")
        callback.on_train_start(None, None)  # type: ignore[arg-type]  # neither is used
        assert signal.getsignal(signal.SIGUSR2) == callback._record
        assert signal.getsignal(signal.SIGTERM) == callback._record
        assert signal.getsignal(signal.SIGCONT) == Preemption._continue
        callback.teardown(None, None, "fit")  # type: ignore[arg-type]
        assert signal.getsignal(signal.SIGUSR2) is usr2
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def test_ignore_late_warning_only_under_slurm(monkeypatch) -> None:
    """Once results are written the warning signal is ignored under SLURM (a late USR2 during interpreter exit
    killed a finished job, state FAILED), and left alone elsewhere."""
    import os

    from atelier.callbacks.preemption import ignore_late_warning

    def usr2(signum: int, frame: FrameType | None) -> None: ...

    signal.signal(signal.SIGUSR2, usr2)
    try:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        assert not ignore_late_warning("USR2")
        assert signal.getsignal(signal.SIGUSR2) is usr2
        monkeypatch.setenv("SLURM_JOB_ID", "1")
        assert ignore_late_warning("USR2")
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR2)  # ignored: this process lives on
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
