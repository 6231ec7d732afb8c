"""A wall-clock training budget: the number of optimiser steps is estimated from the measured speed, and the LR
schedule is stretched so that it still decays to its end (docs/time_budget.md)."""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Timer

from atelier.models.optim import Horizon

log = logging.getLogger(__name__)

Duration = str | int | float | dt.timedelta | dict[str, float]


def parse_duration(value: Duration) -> float:
    """Seconds in ``value``: a number of seconds, ``"DD:HH:MM:SS"`` (as ``trainer.max_time``), a ``timedelta``,
    or a dict of ``timedelta`` keywords (``{"minutes": 18}``).

    Raises:
        ValueError: for anything else, or a duration that is not positive.
    """
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(f"a duration cannot be a bool, got {value!r}")
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        parts = value.strip().split(":")
        try:
            if len(parts) == 1:
                seconds = float(parts[0])
            elif len(parts) == 4:
                days, hours, minutes, secs = (float(p) for p in parts)
                seconds = dt.timedelta(days=days, hours=hours, minutes=minutes, seconds=secs).total_seconds()
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"a duration is seconds or 'DD:HH:MM:SS', got {value!r}") from None
    elif isinstance(value, dict) or hasattr(value, "items"):
        seconds = dt.timedelta(**{str(k): float(v) for k, v in value.items()}).total_seconds()
    else:
        raise ValueError(f"a duration is seconds, 'DD:HH:MM:SS', a timedelta or a dict, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be positive, got {value!r}")
    return seconds


class TimeBudget(Callback):
    """Train for a wall-clock ``budget`` instead of a fixed number of steps, with an LR schedule that still ends.

    The budget is counted from the start of training (``on_train_start``, the clock of ``trainer.max_time``), and
    steps are planned to end ``margin_s`` before it, leaving that much for what follows the last step (the final
    sample grid, the last checkpoint, the pipeline export). After ``skip_steps`` optimiser steps (start-up) the
    next ``warmup_steps`` are timed; from their speed (steps/s) the callback estimates how many steps fit in the
    time left, moves its :class:`~atelier.models.optim.Horizon` there and sets ``trainer`` ``max_steps`` to it.
    Every ``reestimate_every`` of the budget (counted in steps at the speed last measured) it measures the speed
    of the steps since the previous estimate (validation and sample grids included) and moves the horizon again,
    so a machine that slows down or speeds up (another job starting) still ends on time. The LR schedule of the
    single-optimiser modules (``atelier.models.optim.optimizers_config``) follows the horizon: warm-up unchanged,
    then e.g. cosine decay reaching 0 at the last step, with no jump when the horizon moves (see ``Horizon``).

    The callback owns the stopping rule: at setup it sets ``max_epochs`` to unlimited (-1) and ``min_epochs`` to
    0, and ``max_steps`` to unlimited unless it was set explicitly: then it caps the plan (a debug run or a short
    sweep trial with ``trainer.max_steps=N`` still stops at ``N``, with the LR horizon at most ``N``); a minimum
    epoch count would keep ``max_time`` from stopping inside the first
    epoch. Keep ``trainer.max_time`` a little above ``budget`` as the hard stop, in case the speed drops
    sharply after the last estimate.

    Steps are ``trainer.global_step``: optimiser steps. A GAN (manual optimisation) counts its D and its G steps,
    2 per batch with ``n_critic = 1``, so its estimate is in the same units as its ``max_steps``.

    Resume: the budget used so far (``elapsed_s``, seconds) and the horizon are saved in checkpoints, so a resumed
    run spends what is left of the same budget (as Lightning's ``max_time`` does) and its LR schedule continues
    where it stopped; it measures its speed again after ``skip_steps + warmup_steps`` and re-plans. The budget
    itself comes from the config: resume with a larger ``budget`` (and ``max_time``) to extend a run.

    Under DDP every rank re-estimates at the same ``global_step`` with rank 0's measurement, so all ranks agree
    on ``max_steps``.

    Logged: one info line per estimate (speed, planned total, time left, expected end) and ``train/budget_horizon``
    (the planned total, steps) every step once known.

    Args:
        budget: wall-clock budget of training: seconds or ``"DD:HH:MM:SS"``.
        margin_s: seconds at the end of the budget reserved for work after the last step.
        skip_steps: optimiser steps not timed at the start (data-loader start-up, first allocations).
        warmup_steps: optimiser steps timed for the first estimate.
        reestimate_every: fraction of the budget between estimates (0 or ``None``: estimate once).

    Raises:
        ValueError: a duration that cannot be read, ``margin_s`` not below the budget, ``warmup_steps < 1``,
            ``skip_steps < 0`` or ``reestimate_every`` outside ``[0, 1]``.
    """

    def __init__(self, budget: Duration, margin_s: float = 30.0, skip_steps: int = 5, warmup_steps: int = 50,
                 reestimate_every: float | None = 0.1) -> None:
        self.budget_s = parse_duration(budget)
        if not 0 <= margin_s < self.budget_s:
            raise ValueError(f"callbacks.time_budget.margin_s={margin_s} must be in [0, budget={self.budget_s:g} s)")
        if warmup_steps < 1 or skip_steps < 0:
            raise ValueError(f"callbacks.time_budget: warmup_steps={warmup_steps} must be >= 1 and "
                             f"skip_steps={skip_steps} >= 0")
        if reestimate_every is not None and not 0 <= reestimate_every <= 1:
            raise ValueError(f"callbacks.time_budget.reestimate_every={reestimate_every} must be a fraction of "
                             "the budget in [0, 1] (0 or null: estimate once)")
        self.margin_s = float(margin_s)
        self.skip_steps = int(skip_steps)
        self.warmup_steps = int(warmup_steps)
        self.reestimate_every = float(reestimate_every or 0.0)
        self.horizon = Horizon()
        #: one dict per estimate: step, steps_per_s, elapsed_s, remaining_s, total
        self.estimates: list[dict[str, float]] = []
        self.step_cap: int | None = None
        self._elapsed_before = 0.0   # seconds of the budget used before this process (from a checkpoint)
        self._start: float | None = None
        self._end: float | None = None
        self._first_step = 0
        self._window: tuple[int, float] | None = None  # (step, elapsed_s) where the current speed window began
        self._next_estimate: int | None = None         # global step of the next estimate

    # ----------------------------------------------------------------- clock
    @property
    def elapsed_s(self) -> float:
        """Seconds of the budget used so far (earlier runs of a resumed training included)."""
        if self._start is None:
            return self._elapsed_before
        return self._elapsed_before + ((self._end or time.monotonic()) - self._start)

    @property
    def remaining_s(self) -> float:
        """Seconds left for training steps: budget minus margin minus elapsed (may be negative)."""
        return self.budget_s - self.margin_s - self.elapsed_s

    # ----------------------------------------------------------------- hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # an explicit trainer.max_steps (a debug run, a short sweep trial) caps the plan: the user's number wins
        self.step_cap = trainer.max_steps if trainer.max_steps not in (-1, None) else None
        if self.step_cap is not None:
            log.info("TimeBudget: trainer.max_steps=%d caps the %.0f s budget's plan", self.step_cap, self.budget_s)
        elif trainer.max_epochs not in (-1, None):
            log.info("TimeBudget: the %.0f s budget replaces trainer.max_epochs=%s as the stopping rule",
                     self.budget_s, trainer.max_epochs)
        trainer.fit_loop.epoch_loop.max_steps = -1 if self.step_cap is None else self.step_cap
        trainer.fit_loop.max_epochs = -1
        trainer.fit_loop.min_epochs = 0
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        duration = getattr(timer, "_duration", None)
        if duration is None:
            log.warning("TimeBudget: no trainer.max_time; set it a little above the %.0f s budget as a hard stop",
                        self.budget_s)
        elif duration < self.budget_s:
            log.warning("TimeBudget: trainer.max_time (%.0f s) is below the budget (%.0f s): it will stop training "
                        "before the LR schedule has decayed; set it a little above the budget", duration,
                        self.budget_s)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start, self._end = time.monotonic(), None
        self._first_step = trainer.global_step
        self._window = None
        self._next_estimate = self._first_step + self.skip_steps + self.warmup_steps
        if self.horizon.total is not None:  # resumed: keep the saved plan until the speed is measured again
            trainer.fit_loop.epoch_loop.max_steps = max(self.horizon.total, trainer.global_step)
        if self._elapsed_before > 0:
            log.info("TimeBudget: resumed at step %d with %.1f s of the %.1f s budget used (horizon %s steps)",
                     trainer.global_step, self._elapsed_before, self.budget_s, self.horizon.total)
        if self.remaining_s <= 0:
            log.info("TimeBudget: the budget is spent; no more training steps")
            trainer.fit_loop.epoch_loop.max_steps = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._window is None and step >= self._first_step + self.skip_steps:
            self._window = (step, self.elapsed_s)
        if self._next_estimate is not None and self._window is not None and step >= self._next_estimate:
            self._estimate(trainer, step)
        if self.horizon.total is not None:
            pl_module.log("train/budget_horizon", float(self.horizon.total), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end = time.monotonic()

    # ----------------------------------------------------------------- estimate
    def _estimate(self, trainer: Trainer, step: int) -> None:
        assert self._window is not None
        window_step, window_s = self._window
        elapsed = self.elapsed_s
        measured = (step - window_step) / max(elapsed - window_s, 1e-9)
        # one plan for all ranks: rank 0's speed and clock (every rank gets here at the same global step)
        rate, elapsed = trainer.strategy.broadcast((measured, elapsed), src=0)
        remaining = self.budget_s - self.margin_s - elapsed
        previous = self.horizon.total
        target = step + math.floor(rate * max(remaining, 0.0))
        if self.step_cap is not None:
            target = min(target, self.step_cap)
        total = self.horizon.move(target, step)
        trainer.fit_loop.epoch_loop.max_steps = total
        self._window = (step, elapsed)
        every = max(1, round(rate * self.reestimate_every * self.budget_s)) if self.reestimate_every > 0 else None
        self._next_estimate = step + every if every is not None and step + every < total else None
        self.estimates.append({"step": step, "steps_per_s": rate, "elapsed_s": elapsed, "remaining_s": remaining,
                               "total": total})
        if trainer.is_global_zero:
            now = dt.datetime.now()
            end = now + dt.timedelta(seconds=(total - step) / rate if rate > 0 else 0.0)
            log.info("TimeBudget: %.2f steps/s over steps %d-%d -> %d steps in total (%s), %.1f s of %.1f s used; "
                     "training ends ~%s, run with its %.1f s margin ~%s", rate, window_step, step, total,
                     "first estimate" if previous is None else f"was {previous}", elapsed, self.budget_s,
                     end.strftime("%H:%M:%S"), self.margin_s,
                     (end + dt.timedelta(seconds=self.margin_s)).strftime("%H:%M:%S"))

    # ----------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and lists (loadable with ``torch.load(weights_only=True)``): the budget used so far
        (``elapsed_s``, seconds), the budget it was planned for (``budget_s``) and the horizon (steps)."""
        return {"elapsed_s": float(self.elapsed_s), "budget_s": float(self.budget_s),
                "horizon": self.horizon.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._elapsed_before = float(state_dict.get("elapsed_s", 0.0))
        self._start = self._end = None
        self.horizon.load_state_dict(state_dict.get("horizon", {}))
        saved = state_dict.get("budget_s")
        if saved is not None and abs(float(saved) - self.budget_s) > 1e-6:
            log.info("TimeBudget: the checkpoint's run had a %.0f s budget, this one %.0f s: training continues "
                     "until %.0f s in total", float(saved), self.budget_s, self.budget_s)
