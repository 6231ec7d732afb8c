"""Which process is this before Lightning has set up distributed training (rank-0-only side effects)."""

from __future__ import annotations

import os

# environment variables that launchers set: torchrun / Lightning's subprocess launcher / SLURM (srun, submitit)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def is_launch_rank_zero() -> bool:
    """True in the process that owns the run's files: the one Hydra started, not a DDP child process.

    Lightning's subprocess launcher starts the other local ranks with ``LOCAL_RANK`` ≥ 1 (and other nodes with
    ``NODE_RANK`` ≥ 1); torchrun sets ``RANK``; ``srun`` sets ``SLURM_PROCID``. Only the process where all are 0
    or absent writes ``run_info.json``, ``config_tree.log``, ``metrics.json`` and the pipeline export.
    """
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "0")
        if value.strip() not in ("", "0"):
            return False
    return True
