"""The Hydra ``Sweeper`` plugin class of Atelier's Optuna sweeper; the work is in
:mod:`atelier.sweeps.optuna_sweeper` (imported on first use: Hydra imports this module at every start-up)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from atelier.sweeps.config import register_configs

register_configs()


class AtelierOptunaSweeper(Sweeper):
    """Optuna study over Hydra jobs (``hydra.sweeper`` keys: see ``atelier.sweeps.config.AtelierOptunaSweeperConf``).

    Raises:
        ValueError: invalid ``direction``, ``n_trials``, ``n_jobs`` or ``max_failure_rate`` (constructor).
        atelier.sweeps.optuna_sweeper.StudyFailedError: from :meth:`sweep`, when no trial of the study completed
            (the message lists each trial, its params and why it failed) or too many failed.
    """

    def __init__(self, sampler: Any, direction: str, storage: str | None, study_name: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, params: Mapping[str, Any] | None) -> None:
        from atelier.sweeps.optuna_sweeper import OptunaSweep

        self._sweep = OptunaSweep(sampler=sampler, direction=direction, storage=storage, study_name=study_name,
                                  n_trials=n_trials, n_jobs=n_jobs, max_failure_rate=max_failure_rate, params=params)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self._sweep.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.launcher = self._sweep.launcher

    def sweep(self, arguments: list[str]) -> None:
        self._sweep.sweep(arguments)
