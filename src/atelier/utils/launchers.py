"""Which Hydra launchers can run a multirun whose jobs are multi-process (DDP) trainings."""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from atelier.utils.batching import world_size

#: launchers whose jobs may start several training processes: submitit's SLURM launcher (``srun`` starts one
#: process per task, Lightning reads the ranks from SLURM)
DDP_MULTIRUN_LAUNCHERS = ("launcher=slurm",)


def is_multi_process(trainer_cfg: DictConfig) -> bool:
    """True when ``trainer_cfg`` asks for DDP over more than one process (``strategy`` ddp-like, devices ×
    nodes > 1)."""
    strategy = trainer_cfg.get("strategy")
    name = str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy or "")
    if "ddp" not in name.lower():
        return False
    return world_size(trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1),
                      trainer_cfg.get("accelerator")) > 1


def check_ddp_multirun(cfg: DictConfig) -> None:
    """Refuse, before anything trains, a multirun of DDP jobs on a launcher that cannot run them.

    Hydra's basic launcher runs the jobs one after another in this process; Lightning's subprocess DDP launcher
    re-runs the command line for ranks 1..N-1, which works for the first job and not for the second (the
    process-group and the relaunched children of job 0 are still this process's). ``submitit_local`` runs one
    process per job and cannot start more. ``launcher=slurm`` (``srun`` starts one process per task) works.

    Raises:
        ValueError: inside a multirun on another launcher with a multi-process ``trainer`` (names the keys and the
            supported launcher).
    """
    if not HydraConfig.initialized():
        return
    target = str(HydraConfig.get().launcher.get("_target_", ""))
    if "SlurmLauncher" in target or not is_multi_process(cfg.trainer):
        return
    raise ValueError(
        f"a multirun of DDP jobs (trainer.strategy={cfg.trainer.get('strategy')!r}, trainer.devices="
        f"{cfg.trainer.get('devices')!r}) is not supported by hydra.launcher={target.rsplit('.', 1)[-1]}: use "
        f"{' or '.join(DDP_MULTIRUN_LAUNCHERS)} (srun starts the ranks of each job, e.g. "
        "hydra.launcher.tasks_per_node=2), or run one DDP training per command")
