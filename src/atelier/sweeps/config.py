"""Config schema of the Atelier Optuna sweeper, stored in Hydra's ConfigStore.

``hydra/sweeper=atelier_optuna`` selects the sweeper; ``hydra/sweeper/sampler`` is ``tpe`` (default) or ``random``.
This module imports neither Optuna nor torch: Hydra imports it at every start (plugin discovery).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SWEEPER_TARGET = "hydra_plugins.atelier_optuna_sweeper.atelier_optuna_sweeper.AtelierOptunaSweeper"


@dataclass
class TPESamplerConf:
    """``optuna.samplers.TPESampler`` (``_partial_``: the sweeper sets the seed, see ``AtelierOptunaSweeperConf``).

    ``null`` keeps Optuna's default for that argument.
    """

    _target_: str = "optuna.samplers.TPESampler"
    _partial_: bool = True
    seed: int | None = None
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool | None = None
    group: bool = False
    constant_liar: bool = True


@dataclass
class RandomSamplerConf:
    """``optuna.samplers.RandomSampler``."""

    _target_: str = "optuna.samplers.RandomSampler"
    _partial_: bool = True
    seed: int | None = None


@dataclass
class AtelierOptunaSweeperConf:
    """``hydra.sweeper``: an Optuna study driven through Hydra's launcher (see docs/sweeps.md).

    Attributes:
        sampler: ``hydra/sweeper/sampler=tpe|random``, or any ``_target_`` node of an Optuna sampler. A study
            resumed with ``k`` trials already in it seeds the sampler with ``seed + k`` (no repeated draws).
        direction: ``minimize`` or ``maximize`` the value the task function returns.
        storage: Optuna storage URL (``sqlite:///path.db``; its folder is created); ``null``: in memory.
        study_name: the study in ``storage``; an existing one is resumed.
        n_trials: trials this command runs (a resumed study gets ``n_trials`` more).
        n_jobs: trials launched at a time (parallel with a parallel launcher: submitit, SLURM).
        max_failure_rate: the sweep stops with an error when more than this fraction of its trials failed;
            1.0: failed trials never stop it.
        params: the search space, ``key: <override>`` in Hydra's override grammar (``choice(...)``,
            ``interval(a, b)``, ``tag(log, interval(a, b))``, ``range(...)``, or a fixed value).
    """

    _target_: str = SWEEPER_TARGET
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: Any = MISSING
    direction: str = "minimize"
    storage: str | None = None
    study_name: str | None = None
    n_trials: int = 20
    n_jobs: int = 1
    max_failure_rate: float = 1.0
    params: dict[str, Any] | None = None


def register_configs() -> None:
    """Store the sweeper (``hydra/sweeper/atelier_optuna``) and its samplers (``hydra/sweeper/sampler/tpe``,
    ``random``) in Hydra's ConfigStore. Safe to call more than once."""
    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="atelier_optuna", node=AtelierOptunaSweeperConf, provider="atelier")
    cs.store(group="hydra/sweeper/sampler", name="tpe", node=TPESamplerConf, provider="atelier")
    cs.store(group="hydra/sweeper/sampler", name="random", node=RandomSamplerConf, provider="atelier")
