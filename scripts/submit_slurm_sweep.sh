#!/usr/bin/env bash
# Submit an Atelier sweep to SLURM. The sweep's controller (Hydra + the Optuna sweeper or a grid) is itself a small
# CPU job, so the study survives your logout; it submits every trial as a GPU job through submitit
# (configs/launcher/slurm.yaml) and waits for them.
#
#   scripts/submit_slurm_sweep.sh hparams_search=ddpm_optuna experiment=ddpm_mnist_cpu trainer=gpu \
#       hydra.launcher.partition=gpu hydra.sweeper.n_jobs=4            # 4 trials at a time
#   scripts/submit_slurm_sweep.sh experiment=gan_mnist_cpu trainer=gpu seed=1,2,3 hydra.launcher.partition=gpu
#   CONTROLLER_PARTITION=cpu CONTROLLER_TIME=2-00:00:00 scripts/submit_slurm_sweep.sh ...
#   FOREGROUND=1 scripts/submit_slurm_sweep.sh ...   # run the controller here (e.g. inside tmux) instead
#
# Everything after the script name is passed to `python train.py -m launcher=slurm ...`. Re-running the same
# Optuna command resumes its study (SQLite under outputs/optuna/). Each trial that is preempted or reaches its
# time limit checkpoints, is requeued and resumes in its own directory (docs/scaling_out.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
if [ "$#" -eq 0 ]; then
    sed -n '2,16p' "$0"
    exit 2
fi
CMD=("$PYTHON" "$ROOT/train.py" -m launcher=slurm "$@")

if [ "${FOREGROUND:-0}" = "1" ]; then
    cd "$ROOT" && exec "${CMD[@]}"
fi

mkdir -p "$ROOT/outputs/slurm_controllers"
# quote every argument for the job script (overrides may contain brackets, commas or spaces)
printf -v QUOTED '%q ' "${CMD[@]}"
sbatch --job-name="${CONTROLLER_NAME:-atelier-sweep}" \
       --partition="${CONTROLLER_PARTITION:-${SLURM_DEFAULT_PARTITION:-cpu}}" \
       --time="${CONTROLLER_TIME:-3-00:00:00}" \
       --cpus-per-task=1 --mem=4G \
       --output="$ROOT/outputs/slurm_controllers/%j.out" \
       --wrap="cd $(printf '%q' "$ROOT") && $QUOTED"
