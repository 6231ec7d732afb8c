"""Hydra job context: multirun detection and the command line Lightning's DDP launcher re-runs per rank."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, read_write


def _mkdir(path: str) -> str:
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def _cpu_precision() -> str:
    from atelier.utils.precision import cpu_precision  # imports torch: only when a config asks for it

    return cpu_precision()


def _lowest_resolution(image_size: int, block_out_channels: Any) -> list[int]:
    return [int(image_size) // 2 ** (len(block_out_channels) - 1)]


def register_resolvers() -> None:
    """``${atelier.mkdir:<dir>}``: creates ``<dir>`` and returns it (e.g. for the Optuna SQLite storage, whose
    folder must exist before the sweeper opens it). ``${atelier.cpu_precision:}``: ``bf16-mixed`` on a CPU with
    bf16 matrix units, else ``32-true`` (:func:`atelier.utils.precision.cpu_precision`; ``configs/trainer/cpu.yaml``).
    ``${atelier.lowest_resolution:<image_size>,<block_out_channels>}``: ``[image_size / 2^(levels - 1)]``, the side
    in px of a UNet's lowest level, where ``configs/model/ddpm.yaml`` puts self-attention (8 px at 32 px, 16 px at
    64 px). Safe to call more than once."""
    if not OmegaConf.has_resolver("atelier.mkdir"):
        OmegaConf.register_new_resolver("atelier.mkdir", _mkdir)
    if not OmegaConf.has_resolver("atelier.cpu_precision"):
        OmegaConf.register_new_resolver("atelier.cpu_precision", _cpu_precision)
    if not OmegaConf.has_resolver("atelier.lowest_resolution"):
        OmegaConf.register_new_resolver("atelier.lowest_resolution", _lowest_resolution)


KEPT_HYDRA_OVERRIDES = ("hydra.searchpath", "hydra.job.chdir", "hydra.verbose", "hydra.job_logging",
                        "hydra.hydra_logging", "hydra/job_logging", "hydra/hydra_logging")


def in_multirun() -> bool:
    """True inside a job of ``python train.py -m ...`` (grid multirun, Optuna sweep, submitit launcher)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def in_optimizing_sweep() -> bool:
    """True inside a job of a sweep that optimises the returned value (any sweeper but Hydra's basic grid one,
    e.g. Optuna): there a diverged run must fail its trial instead of returning NaN."""
    return in_multirun() and "BasicSweeper" not in str(HydraConfig.get().sweeper.get("_target_", ""))


def relaunch_ranks_into_job_dir(script: str | Path) -> None:
    """Make Lightning's subprocess DDP launcher start ranks 1..N-1 of *this* multirun job in *its* directory.

    Lightning (``_hydra_subprocess_cmd``) re-runs ``sys.argv`` plus ``hydra.run.dir=<HydraConfig run.dir>``. In a
    multirun ``sys.argv`` is the whole sweep (``-m lr=1,2 ...``) and ``run.dir`` is not the job's directory, so
    every rank would start a sweep of its own in a new directory. Here ``sys.argv`` becomes this job's own
    overrides (``hydra.overrides.task``) and ``run.dir`` the job's output directory: one directory per job, the
    ranks inside it. Call it in the launching process, before ``trainer.fit``; ``script`` is the entry point
    (``train.py``), also when a submitit process runs the job.
    """
    hydra_cfg = HydraConfig.get()
    # Hydra settings that change what the job composes or logs (not the sweep's own: dir, launcher, sweeper)
    kept = [o for o in hydra_cfg.overrides.hydra if o.startswith(KEPT_HYDRA_OVERRIDES)]
    # hydra.mode=RUN: a config that sets hydra.mode=MULTIRUN must not turn a rank into a sweep
    sys.argv = [str(Path(script).resolve()), *hydra_cfg.overrides.task, *kept, "hydra.mode=RUN"]
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
