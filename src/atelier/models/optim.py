"""Optimiser and per-step LR schedule from the partials in a model config (shared by the single-optimiser
modules: DDPM, VAE, the image-to-image models), and the horizon-aware schedule a wall-clock budget uses
(:class:`Horizon`, :func:`horizon_scheduler`; the budget itself is :class:`atelier.callbacks.time_budget.TimeBudget`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning import Trainer
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]

# the length (steps after the warm-up) a horizon-aware schedule is built with before being stretched to the horizon
NOMINAL_STEPS = 1_000_000


@dataclass
class Horizon:
    """The planned training length in optimiser steps (``trainer.global_step`` units), mutable, shared by
    :func:`horizon_scheduler` (which reads it) and whoever estimates it (``TimeBudget``, which moves it).

    Progress through the decay phase of a schedule is a fraction in ``[0, 1]`` that is never recomputed from
    scratch: from the step where the horizon was last moved, the progress still left is spread evenly over the
    steps still left, ``p(k) = p(k0) + (1 - p(k0)) · (k - k0) / (total - k0)``. Moving the horizon therefore only
    changes the *rate* of progress from then on, never its value: the LR is continuous, progress never goes back
    (a cosine LR never rises after its warm-up), and it reaches exactly 1 (cosine: LR 0) at the last planned
    step. With a horizon that never moves this is the usual ``(k - start) / (total - start)``.

    Attributes:
        total: planned last step (steps), ``None`` while unknown (progress then stays where it is).
        history: ``(from_step, total)`` each time the horizon moved, in step order.
    """

    total: int | None = None
    history: list[tuple[int, int]] = field(default_factory=list)

    def move(self, total: int, step: int) -> int:
        """Plan ``total`` steps in all from ``step`` on (both in steps); returns the total set, at least
        ``step + 1``.

        Raises:
            ValueError: when ``step`` lies before the step of the previous move.
        """
        step = int(step)
        if self.history and step < self.history[-1][0]:
            raise ValueError(f"the horizon was moved at step {self.history[-1][0]}; cannot move it at step {step}")
        total = max(int(total), step + 1)
        if self.history and self.history[-1][0] == step:
            self.history[-1] = (step, total)  # the previous plan never ran a step: replace it
        else:
            self.history.append((step, total))
        self.total = total
        return total

    def progress(self, step: float, start: int = 0) -> float:
        """Fraction in ``[0, 1]`` of a decay phase that begins at step ``start`` (e.g. after an LR warm-up)
        completed at ``step`` (steps). Zero before the horizon is first set; non-decreasing in ``step``."""
        p = 0.0
        for i, (begin, total) in enumerate(self.history):
            end = self.history[i + 1][0] if i + 1 < len(self.history) else math.inf
            a, b = max(begin, start), min(end, step)
            if b <= a:
                continue
            if b >= total:
                return 1.0  # this plan's last step is reached (exactly 1: the schedule's final value)
            p += (1.0 - p) * (b - a) / (total - a)
        return min(p, 1.0)

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and lists (loadable with ``torch.load(weights_only=True)``)."""
        return {"total": self.total, "history": [[int(s), int(t)] for s, t in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore in place, so schedules already holding this object see the restored horizon."""
        self.total = None if state.get("total") is None else int(state["total"])
        self.history = [(int(s), int(t)) for s, t in state.get("history", [])]


def find_horizon(trainer: Trainer | None) -> Horizon | None:
    """The :class:`Horizon` of a callback on ``trainer`` that plans the training length (an attribute
    ``horizon``, e.g. ``TimeBudget``), or ``None``."""
    for callback in getattr(trainer, "callbacks", None) or []:
        horizon = getattr(callback, "horizon", None)
        if isinstance(horizon, Horizon):
            return horizon
    return None


def horizon_scheduler(optimizer: torch.optim.Optimizer, lr_scheduler: SchedulerFactory, horizon: Horizon,
                      num_warmup_steps: int | None = None) -> LambdaLR:
    """The schedule ``lr_scheduler`` (any ``LambdaLR`` factory called as
    ``lr_scheduler(optimizer=..., num_training_steps=...)``, e.g. ``diffusers.optimization.get_scheduler`` with
    ``name=cosine``) stretched to a moving ``horizon``: the first ``num_warmup_steps`` steps are the schedule's own
    warm-up, unchanged; after it, step ``k`` gets the schedule's value at the same fraction
    ``horizon.progress(k, start=num_warmup_steps)`` of its decay phase. The LR reaches the schedule's final value
    (0 for ``cosine``/``linear``) at ``horizon.total``.

    Args:
        optimizer: the optimiser to schedule.
        lr_scheduler: the schedule factory.
        horizon: the training length, read at every step.
        num_warmup_steps: warm-up length (steps); default the factory's own ``num_warmup_steps`` keyword
            (a Hydra ``_partial_``), else 0.

    Raises:
        ValueError: when the factory does not build a ``LambdaLR``.
    """
    if num_warmup_steps is None:
        num_warmup_steps = int((getattr(lr_scheduler, "keywords", None) or {}).get("num_warmup_steps") or 0)
    warmup = max(int(num_warmup_steps), 0)
    nominal = warmup + NOMINAL_STEPS
    base = lr_scheduler(optimizer=optimizer, num_training_steps=nominal)
    if not isinstance(base, LambdaLR):
        raise ValueError(f"a time budget stretches LambdaLR schedules only; model.lr_scheduler built a "
                         f"{type(base).__name__}: use diffusers.optimization.get_scheduler or null")

    def stretch(fn: Callable[[float], float]) -> Callable[[int], float]:
        # a plain function, not a callable object: LambdaLR does not put it in checkpoints (the horizon is saved
        # by its owner), so checkpoints stay loadable with weights_only=True
        def lr_lambda(step: int) -> float:
            if step < warmup:
                return fn(step)
            return fn(warmup + horizon.progress(step, start=warmup) * NOMINAL_STEPS)

        return lr_lambda

    # a fresh LambdaLR on the same optimiser: its base LRs are the param groups' initial_lr, set by `base`
    return LambdaLR(optimizer, [stretch(fn) for fn in base.lr_lambdas])


def build_scheduler(trainer: Trainer, optimizer: torch.optim.Optimizer, lr_scheduler: SchedulerFactory,
                    total_steps: float | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule ``lr_scheduler`` (called as ``lr_scheduler(optimizer=..., num_training_steps=...)``, e.g.
    ``diffusers.optimization.get_scheduler`` with ``name`` and ``num_warmup_steps``) over ``optimizer``, for a
    length in optimiser steps. When a callback on the trainer plans the length (a time budget, see
    :func:`find_horizon`), the schedule follows that callback's moving :class:`Horizon` (:func:`horizon_scheduler`);
    otherwise its length is ``total_steps``, default ``trainer.estimated_stepping_batches``.

    Raises:
        ValueError: when the training length is unbounded (no max_steps/max_epochs and no time budget).
    """
    horizon = find_horizon(trainer)
    if horizon is not None:
        return horizon_scheduler(optimizer, lr_scheduler, horizon)
    total = trainer.estimated_stepping_batches if total_steps is None else total_steps
    if not math.isfinite(total):
        raise ValueError("an LR schedule needs a finite training length: set trainer.max_steps or max_epochs, "
                         "or a time budget (callbacks/time_budget)")
    return lr_scheduler(optimizer=optimizer, num_training_steps=int(total))


def make_optimizer(factory: OptimizerFactory, params: Iterable[nn.Parameter],
                   key: str = "model.optimizer") -> torch.optim.Optimizer:
    """``factory(params)``, with a config's ``betas`` passed as floats and a refusal that names the config key.

    Hydra reads ``betas: [0, 0.99]`` (β1 = 0, as GAN papers write it) as an int and a float, and torch's Adam/AdamW
    then refuse with "betas must be either both floats or both Tensors", naming no key. Here numeric ``betas`` of a
    partial (a Hydra ``_partial_: true`` config) are passed as a tuple of floats.

    Args:
        factory: the optimiser partial, e.g. ``torch.optim.Adam`` with ``lr`` and ``betas``.
        params: the parameters (or parameter groups) to optimise.
        key: the config key of ``factory``, for the error message (``model.optimizer``, ``model.optimizer_g`` ...).

    Raises:
        ValueError: when the optimiser refuses its arguments (naming ``key`` and the optimiser's reason).
    """
    keywords = getattr(factory, "keywords", None) or {}
    overrides: dict[str, Any] = {}
    betas = keywords.get("betas")
    if betas is not None and not isinstance(betas, str | torch.Tensor):
        try:
            values = list(betas)
        except TypeError:
            values = []
        if values and all(isinstance(b, int | float) and not isinstance(b, bool) for b in values):
            overrides["betas"] = tuple(float(b) for b in values)
    try:
        return factory(params, **overrides)
    except (TypeError, ValueError) as err:
        name = getattr(getattr(factory, "func", factory), "__name__", type(factory).__name__)
        raise ValueError(f"{key} ({name}, arguments {dict(keywords)}) was refused: {err}") from err


def optimizers_config(
    trainer: Trainer,
    params: Iterable[nn.Parameter],
    optimizer: OptimizerFactory,
    lr_scheduler: SchedulerFactory | None = None,
    key: str = "model.optimizer",
) -> Any:
    """What ``LightningModule.configure_optimizers`` returns: the optimiser over ``params`` and, when
    ``lr_scheduler`` is given, that schedule (:func:`build_scheduler`: over ``trainer.estimated_stepping_batches``
    steps, or following a time budget's horizon) stepped every optimiser step (logged as ``lr``).

    Raises:
        ValueError: when a schedule is asked for but the training length is unbounded (no max_steps/max_epochs
            and no time budget), or when the optimiser refuses its arguments (:func:`make_optimizer`, naming
            ``key``).
    """
    opt = make_optimizer(optimizer, params, key)
    if lr_scheduler is None:
        return opt
    scheduler = build_scheduler(trainer, opt, lr_scheduler)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}
