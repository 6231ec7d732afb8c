"""When a periodic callback fires: once each time ``trainer.global_step`` reaches *or passes* a multiple of n.

``global_step % n == 0`` misses multiples that the step jumps over. A GAN with ``n_critic = 2`` advances the
global step by 1 on a D-only batch and by 2 on a D + G batch (1, 3, 4, 6, 7, …), so with ``n = 1000`` the
step 2000 never occurs and a ``%`` test skips that grid (seen in stop 29: ``gan_art_cpu model.n_critic=2`` wrote
``step_0001000.png`` and ``step_0003000.png`` but no ``step_0002000.png``).
"""

from __future__ import annotations


class EveryNSteps:
    """Stateful test ``fire(step)``: true when a multiple of ``n`` lies in ``(previous step seen, step]``.

    The first call compares with ``step - 1`` (so a run resumed at step 4000 does not fire again at 4001). The same
    step seen twice (gradient accumulation: several batches per optimiser step) fires at most once.

    Args:
        n: interval in optimiser steps; ``n <= 0`` never fires.
    """

    def __init__(self, n: int) -> None:
        self.n = int(n)
        self._seen: int | None = None

    def fire(self, step: int) -> bool:
        """Record ``step`` (``trainer.global_step``) and say whether a periodic action is due at it."""
        previous = step - 1 if self._seen is None else self._seen
        self._seen = step
        return self.n > 0 and step > 0 and step // self.n > previous // self.n
