"""Train a generative model: `python train.py model=ddpm data=mnist` (see configs/train.yaml)."""

import os
from pathlib import Path

os.environ.setdefault("ATELIER_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig

from atelier.utils.hydra_jobs import (
    in_multirun,
    in_optimizing_sweep,
    register_resolvers,
    relaunch_ranks_into_job_dir,
)

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from atelier.tasks.train import metric_value, run

    if in_multirun():
        from atelier.utils.launchers import check_ddp_multirun

        check_ddp_multirun(cfg)  # DDP jobs in a multirun: launcher=slurm only (clear error otherwise)
        # Lightning's DDP launcher re-runs the command line per rank: make it the job's, not the sweep's
        relaunch_ranks_into_job_dir(__file__)
    # in an Optuna sweep a NaN objective raises, so the sweeper records a failed trial and goes on
    return metric_value(run(cfg), cfg.get("optimized_metric"), strict=in_optimizing_sweep())


if __name__ == "__main__":
    main()
