"""The ``train`` task: compose datamodule, model, callbacks, loggers and trainer from the config and fit."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from atelier.callbacks.checkpoint_extras import CheckpointExtras
from atelier.callbacks.preemption import Preemption, ignore_late_warning
from atelier.utils.allocator import tune_cpu_allocator
from atelier.utils.batching import apply_global_batch_size
from atelier.utils.config import instantiate_group, print_config_tree, run_info, write_json
from atelier.utils.loggers import finish_wandb
from atelier.utils.ranks import is_launch_rank_zero
from atelier.utils.resume import resolve_ckpt_path

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train the model that ``cfg`` describes; return the final metrics (also written to ``metrics.json``).

    Writes into ``cfg.paths.output_dir``: ``checkpoints/`` (``last.ckpt`` and periodic ones), ``samples/``,
    ``wandb/`` and CSV/TensorBoard logs, ``run_info.json`` (git commit, packages, seed), ``config_tree.log``,
    ``metrics.json`` and, for models with ``save_pretrained``, a diffusers pipeline directory ``pipeline/``.
    ``wandb.finish()`` is always called, so multirun jobs get separate W&B runs.

    Resume: an explicit ``ckpt_path`` wins; else with ``resume: auto`` the run's own newest checkpoint in
    ``output_dir`` (a relaunch into the same directory, a requeued SLURM job). Under DDP, files other than
    Lightning's own (checkpoints, loggers, sample grids: rank 0) are written by the launching process only.
    ``global_batch_size`` (optional) sets ``data.batch_size`` and ``trainer.accumulate_grad_batches``.

    Raises:
        ValueError: a wrong ``resume``/``global_batch_size``/``micro_batch_size`` value (names the key), or
            gradient accumulation requested for a module with manual optimisation (GAN).
    """
    tune_cpu_allocator()  # large CPU tensors reuse freed memory (atelier.utils.allocator)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    owner = is_launch_rank_zero()
    apply_global_batch_size(cfg)
    if cfg.get("print_config", True) and owner:
        print_config_tree(cfg, save_to=output_dir / "config_tree.log")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if owner:
        write_json(run_info(cfg.get("seed")), output_dir / "run_info.json")
    ckpt_path, resume_step = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.get("resume", "auto"), output_dir)
    if ckpt_path and not cfg.get("ckpt_path"):
        log.info("Resuming from the run's own checkpoint %s (global step %s; resume=auto)", ckpt_path, resume_step)

    try:
        log.info("Instantiating datamodule <%s>", cfg.data._target_)
        datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
        log.info("Instantiating model <%s>", cfg.model._target_)
        model: L.LightningModule = hydra.utils.instantiate(cfg.model)
        callbacks = instantiate_group(cfg.get("callbacks"))
        stored = {"model": OmegaConf.to_container(cfg.model, resolve=True),
                  "data": OmegaConf.to_container(cfg.data, resolve=True)}
        if cfg.get("sampling") is not None:  # sampling defaults of the recipe, read by sample.py / evaluate.py
            stored["sampling"] = OmegaConf.to_container(cfg.sampling, resolve=True)
        callbacks.append(CheckpointExtras(stored))
        preemption = Preemption(cfg.get("preemption_signal"))
        callbacks.append(preemption)
        loggers: list[Logger] = instantiate_group(cfg.get("logger"))
        trainer_overrides: dict[str, Any] = {}
        if not model.automatic_optimization and cfg.trainer.get("accumulate_grad_batches", 1) != 1:
            raise ValueError(f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches} is not "
                             f"allowed for {type(model).__name__} (manual optimisation): use 1, e.g. by leaving "
                             "micro_batch_size null with global_batch_size")
        strategy = cfg.trainer.get("strategy")
        if not model.automatic_optimization and strategy is not None:
            # manual optimisation (GAN) backpropagates D and G in turn: DDP must allow parameters without grads
            if strategy == "ddp":
                trainer_overrides["strategy"] = "ddp_find_unused_parameters_true"
            elif (isinstance(strategy, DictConfig) and str(strategy.get("_target_", "")).endswith("DDPStrategy")
                  and not strategy.get("find_unused_parameters")):
                trainer_overrides["strategy"] = hydra.utils.instantiate(strategy, find_unused_parameters=True)
            if "strategy" in trainer_overrides:
                log.info("%s uses manual optimisation: DDP with find_unused_parameters=True", type(model).__name__)
        if not model.automatic_optimization and cfg.trainer.get("gradient_clip_val"):
            # Lightning refuses automatic clipping with manual optimisation (GAN); the module owns its steps
            log.warning("%s uses manual optimisation: trainer.gradient_clip_val=%s is ignored",
                        type(model).__name__, cfg.trainer.gradient_clip_val)
            trainer_overrides["gradient_clip_val"] = None
        if SLURMEnvironment.detect() and "plugins" not in cfg.trainer:
            # one owner of requeueing: submitit (see atelier.callbacks.preemption), not Lightning's auto-requeue
            trainer_overrides["plugins"] = [SLURMEnvironment(auto_requeue=False)]
        trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                     **trainer_overrides)

        resolved = OmegaConf.to_container(cfg, resolve=True)
        for logger in trainer.loggers:
            logger.log_hyperparams(resolved)

        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        fit_seconds = time.perf_counter() - start
        objective = cfg.get("optimized_metric")
        from lightning.pytorch.utilities.model_helpers import is_overridden

        if (isinstance(objective, str) and objective.startswith("val/") and objective not in trainer.callback_metrics
                and not trainer.interrupted and not trainer.fast_dev_run and trainer.limit_val_batches
                and is_overridden("val_dataloader", datamodule) and is_overridden("validation_step", model)):
            # the run ended before its first validation (e.g. max_steps below val_check_interval): without this
            # the objective is missing and a sweep trial fails. validate() resets callback_metrics: keep the rest
            log.info("optimized_metric=%s was not logged (no validation ran during training): one final validation",
                     objective)
            trained = dict(trainer.callback_metrics)
            trainer.validate(model, datamodule=datamodule, verbose=False)
            for key, value in trained.items():
                trainer.callback_metrics.setdefault(key, value)

        if not trainer.fast_dev_run and not trainer.interrupted:
            # last.ckpt always holds the final state, also when max_time/max_steps ended between periodic saves
            trainer.save_checkpoint(output_dir / "checkpoints" / "last.ckpt")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        metrics.update(global_step=trainer.global_step, fit_seconds=round(fit_seconds, 1))
        if trainer.is_global_zero:
            if hasattr(model, "save_pretrained") and not trainer.fast_dev_run and cfg.get("export_pipeline", True):
                path = model.save_pretrained(output_dir / "pipeline")
                log.info("diffusers pipeline saved to %s", path)
            write_json(metrics, output_dir / "metrics.json")
        log.info("Output directory: %s", output_dir)
        # finished and written: a late warning signal must not kill the job while submitit saves the result
        ignore_late_warning(cfg.get("preemption_signal"))
        return metrics
    finally:
        # never raises, so it cannot replace an exception in flight (a preemption's SystemExit, Ctrl-C)
        finish_wandb(exit_code=0 if sys.exc_info()[0] is None else 1)


def metric_value(metrics: dict[str, Any], name: str | None, strict: bool = False) -> float | None:
    """The metric ``name`` from ``metrics`` (for sweepers), or ``None`` when no name is given.

    A name that was not logged gives a warning listing the available metrics, and ``None`` (the Optuna sweeper
    records such a trial as FAIL). With ``strict`` (inside an Optuna sweep) a NaN or infinite value raises, so the
    sweeper records the trial as FAIL and the study goes on: hydra-optuna-sweeper 1.3 crashes on a NaN return.

    Raises:
        ValueError: ``strict`` and the metric is NaN or infinite.
    """
    if not name:
        return None
    if name not in metrics:
        log.warning("optimized_metric=%r was not logged; available: %s", name, sorted(metrics))
        return None
    value = float(metrics[name])
    if strict and not math.isfinite(value):
        raise ValueError(f"optimized_metric={name!r} is {value} (training diverged): trial failed")
    return value
