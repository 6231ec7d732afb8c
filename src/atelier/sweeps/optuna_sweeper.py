"""An Optuna study run through Hydra's launcher with Optuna's ask-and-tell interface.

Each batch of ``n_jobs`` trials is asked from the study, launched as Hydra jobs
(``launcher.launch(overrides, initial_job_idx=...)``: basic launcher, submitit local or SLURM) and told back:
COMPLETE with the job's return value, or FAIL, with the reason in the trial's user attribute ``fail_reason``,
when the job raised or returned None, NaN, infinity or a non-number. The study lives in ``storage`` and is
resumed by the same command. The Hydra plugin class is
``hydra_plugins.atelier_optuna_sweeper.atelier_optuna_sweeper.AtelierOptunaSweeper``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, Trial, TrialState

from atelier.sweeps.search_space import SearchSpace

log = logging.getLogger(__name__)
DIRECTIONS = ("minimize", "maximize")
RESULTS_FILE = "optimization_results.yaml"


class StudyFailedError(RuntimeError):
    """The sweep cannot report a best trial: every trial failed, or more than ``max_failure_rate`` of them."""


@dataclass
class Outcome:
    """What a finished job means for its trial: a value (COMPLETE) or the reason it failed (FAIL)."""

    value: float | None
    reason: str | None
    output_dir: str | None


def one_line(text: str) -> str:
    """``text`` on one line (an exception message may span several): its lines joined with `` | ``."""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def judge(ret: JobReturn) -> Outcome:
    """The outcome of one launched job: FAIL when it raised (reason: the exception, on one line) or its return
    value is None, not a number, NaN or infinite; else COMPLETE with the value."""
    output_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
    try:
        value = ret.return_value
    except Exception as e:  # the job's own exception, re-raised by JobReturn
        return Outcome(None, one_line(f"{type(e).__name__}: {e}"), output_dir)
    if value is None:
        return Outcome(None, "the job returned None (its optimized_metric was not logged?)", output_dir)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return Outcome(None, f"the job returned {value!r}, not a number", output_dir)
    if not math.isfinite(number):
        return Outcome(None, f"the job returned {number}", output_dir)
    return Outcome(number, None, output_dir)


def describe_trials(trials: Sequence[FrozenTrial]) -> str:
    """One line per trial: number, state, params, output directory and, for a failed one, why."""
    lines = []
    for t in trials:
        why = t.user_attrs.get("fail_reason", "no reason recorded") if t.state == TrialState.FAIL else t.state.name
        where = f" in {t.user_attrs['output_dir']}" if t.user_attrs.get("output_dir") else ""
        lines.append(f"  trial {t.number} {t.params}{where}: {why}")
    return "\n".join(lines)


def make_sampler(sampler: Any, n_existing: int) -> optuna.samplers.BaseSampler | None:
    """The study's sampler from the ``sampler`` config: a sampler, or a factory (``_partial_``) that is given
    ``seed + n_existing`` when it has a seed, so a resumed study does not draw its first trials again.

    Raises:
        TypeError: ``sampler`` is neither an Optuna sampler, a factory of one nor None.
    """
    if sampler is None or isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    if not callable(sampler):
        raise TypeError(f"hydra.sweeper.sampler must be an Optuna sampler config, got {sampler!r}")
    seed = getattr(sampler, "keywords", {}).get("seed")
    made = sampler(seed=seed + n_existing) if seed is not None else sampler()
    if not isinstance(made, optuna.samplers.BaseSampler):
        raise TypeError(f"hydra.sweeper.sampler made a {type(made).__name__}, not an Optuna sampler")
    return made


class OptunaSweep:
    """The sweeper's work, behind the thin Hydra plugin class (see the module doc).

    Raises (constructor):
        ValueError: ``direction`` not minimize/maximize, ``n_trials`` < 0, ``n_jobs`` < 1 or ``max_failure_rate``
            outside [0, 1].
    """

    def __init__(self, sampler: Any, direction: str, storage: str | None, study_name: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, params: Mapping[str, Any] | None) -> None:
        if not isinstance(direction, str) or direction.lower() not in DIRECTIONS:
            raise ValueError(f"hydra.sweeper.direction={direction!r}: use one of {DIRECTIONS} (one objective)")
        if n_trials < 0 or n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_trials={n_trials} must be >= 0 and n_jobs={n_jobs} >= 1")
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ValueError(f"hydra.sweeper.max_failure_rate={max_failure_rate} must be in [0, 1]")
        self.sampler, self.direction, self.storage = sampler, direction.lower(), storage
        self.study_name, self.n_trials, self.n_jobs = study_name, n_trials, n_jobs
        self.max_failure_rate = max_failure_rate
        self.params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else params
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Keep the sweep config and instantiate ``hydra.launcher``."""
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def open_study(self) -> optuna.Study:
        """Create the study, or load it from ``storage`` when it exists (its direction must match).

        Raises:
            ValueError: the stored study optimises in the other direction.
        """
        if self.storage and self.storage.startswith("sqlite:///"):
            Path(self.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(storage=self.storage, study_name=self.study_name, direction=self.direction,
                                    load_if_exists=True)
        sampler = make_sampler(self.sampler, len(study.get_trials(deepcopy=False)))
        if sampler is not None:
            study.sampler = sampler
        if study.direction.name.lower() != self.direction:
            raise ValueError(f"study {study.study_name!r} in {self.storage} was created to "
                             f"{study.direction.name.lower()}, not {self.direction}: use another study_name")
        return study

    def sweep(self, arguments: list[str]) -> None:
        """Run ``n_trials`` trials in batches of ``n_jobs``; write ``optimization_results.yaml`` into the sweep dir.

        Raises:
            StudyFailedError: the study has no completed trial at the end (every trial failed; the message lists
                each trial, its params and why it failed), or more than ``max_failure_rate`` of this sweep's
                trials failed.
            BaseException: the launcher's own error (e.g. a SLURM job that could not run, Ctrl-C), after the
                batch's trials are told FAIL.
        """
        assert self.config is not None and self.launcher is not None, "setup() first"
        space = SearchSpace.from_config(self.params, arguments)
        study = self.open_study()
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info("Optuna %s: study %r in %s (%d trials so far), %s, %d trials, %d at a time; search space:\n%s",
                 optuna.__version__, study.study_name, self.storage or "memory", len(study.trials), self.direction,
                 self.n_trials, self.n_jobs, space.describe())
        mine: list[int] = []
        failed: list[int] = []
        while len(mine) < self.n_trials:
            size = min(self.n_jobs, self.n_trials - len(mine))
            trials = [study.ask(fixed_distributions=space.distributions) for _ in range(size)]
            mine += [t.number for t in trials]
            failed += self._run_batch(study, trials, space.overrides)
            self._write_results(study, sweep_dir)
            if failed and len(failed) / len(mine) > self.max_failure_rate:
                raise StudyFailedError(
                    f"{len(failed)} of {len(mine)} trials failed (more than max_failure_rate="
                    f"{self.max_failure_rate}); the sweep stops:\n{describe_trials(self._frozen(study, failed))}")
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            every = study.get_trials(deepcopy=False)
            raise StudyFailedError(
                f"study {study.study_name!r} ({self.storage or 'in memory'}) has no completed trial: "
                f"{len(every)} trial(s), none completed. Each trial, its params and why it failed:\n"
                f"{describe_trials(every)}\nFix the cause and run the same command again: the study resumes.")
        if len(failed) == len(mine) and mine:
            log.warning("All %d trials of this sweep failed; the best trial is an earlier one", len(mine))
        best = study.best_trial
        log.info("Best trial %d (%s): value %s, params %s; results in %s", best.number, self.direction, best.value,
                 best.params, sweep_dir / RESULTS_FILE)

    def _run_batch(self, study: optuna.Study, trials: list[Trial],
                   overrides: Callable[[Mapping[str, Any]], list[str]]) -> list[int]:
        """Launch ``trials`` as one batch of jobs and tell the study their outcomes; return the failed numbers."""
        assert self.launcher is not None
        batch = [overrides(t.params) for t in trials]
        try:
            returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            if len(returns) != len(trials):
                raise RuntimeError(f"the launcher returned {len(returns)} results for {len(trials)} jobs")
        except BaseException as e:
            for t in trials:
                t.set_user_attr("fail_reason", one_line(f"the launcher failed: {type(e).__name__}: {e}"))
                study.tell(t, state=TrialState.FAIL)
            raise
        self.job_idx += len(trials)
        failed = []
        for trial, ret in zip(trials, returns, strict=True):
            outcome = judge(ret)
            if outcome.output_dir:
                trial.set_user_attr("output_dir", str(outcome.output_dir))
            if outcome.reason is None:
                study.tell(trial, outcome.value)
                log.info("Trial %d: %s", trial.number, outcome.value)
            else:
                trial.set_user_attr("fail_reason", outcome.reason)
                study.tell(trial, state=TrialState.FAIL)
                log.warning("Trial %d failed (recorded as FAIL, the study goes on): %s", trial.number, outcome.reason)
                failed.append(trial.number)
        return failed

    @staticmethod
    def _frozen(study: optuna.Study, numbers: Sequence[int]) -> list[FrozenTrial]:
        wanted = set(numbers)
        return [t for t in study.get_trials(deepcopy=False) if t.number in wanted]

    def _write_results(self, study: optuna.Study, sweep_dir: Path) -> None:
        """``optimization_results.yaml``: the best trial so far (skipped while none completed)."""
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return
        best = study.best_trial
        counts: dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        results = {"name": "optuna", "study_name": study.study_name, "storage": self.storage,
                   "direction": self.direction, "best_trial": best.number, "best_value": best.value,
                   "best_params": dict(best.params), "best_output_dir": best.user_attrs.get("output_dir"),
                   "trials": counts}
        OmegaConf.save(OmegaConf.create(results), sweep_dir / RESULTS_FILE)
