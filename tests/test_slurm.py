"""launcher=slurm on a real one-node SLURM cluster (real sbatch, scancel, scontrol; scripts/slurm_local_cluster.sh):
a grid multirun, preemption with and without warning, the time limit. Each job is a tiny DDPM on 1 CPU.

What every preemption test checks: the job is requeued (Restarts=1), the requeued attempt resumes in the same run
directory from its newest checkpoint and reaches max_steps, there is one W&B run id (the first attempt's log holds
a ``preempting`` and an ``exit`` record), the submitting ``train.py -m`` exits 0 with the final attempt's metrics
in submitit's result file, and no job log holds a traceback."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf

from atelier.utils.loggers import run_id
from tests.scale_out_utils import run_train, tiny_args, train_env, wandb_run_ids
from tests.slurm_utils import (
    finished_job,
    job_ids,
    job_logs,
    scontrol_job,
    submitit_result,
    wait_until,
    wandb_record_types,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# one CPU per job, no GPU; every job of the array may run at once on the 2-CPU node
SLURM = ["-m", "launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.tasks_per_node=1", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
         "trainer=cpu", "trainer.precision=32-true", "trainer.devices=1", "trainer.num_nodes=1"]
RESUMED = re.compile(r"Resuming from the run's own checkpoint (\S+) \(global step (\d+)")


def _args(max_steps: int, *extra: str) -> list[str]:
    return [*SLURM, *tiny_args("ddpm", "logger=[wandb,csv]", f"trainer.max_steps={max_steps}",
                               "trainer.max_epochs=-1", f"trainer.val_check_interval={max_steps // 2}",
                               "trainer.check_val_every_n_epoch=null", "trainer.log_every_n_steps=10",
                               "callbacks.sample_grid.on_train_end=false", "optimized_metric=val/loss", *extra)]


def _env(tmp_path: Path, cluster: dict[str, str]) -> dict[str, str]:
    return train_env(tmp_path / "outputs", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **cluster)


def _start(args: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    from tests.scale_out_utils import start_train

    return start_train(args, env, log_file)


def _check_final(sweep: Path, job: str, max_steps: int | None, cluster: dict[str, str],
                 restarts: int = 1) -> list[list[str]]:
    """The assertions every interrupted-and-requeued job must pass; returns the record types of each W&B
    attempt (offline transaction logs, oldest first). ``max_steps`` None: the run ended on ``trainer.max_time``
    (whose clock Lightning keeps in the checkpoint across attempts)."""
    run_dir = sweep / "0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if max_steps is not None:
        assert metrics["global_step"] == max_steps
    final_step = metrics["global_step"]
    info = finished_job(job, cluster)
    assert info.get("JobState") == "COMPLETED", info
    assert int(info["Restarts"]) == restarts, info
    logs = job_logs(sweep, job)
    tb = logs.find("Traceback")
    assert tb < 0, logs[max(0, tb - 3000):tb + 4000]
    resumed = RESUMED.findall(logs)
    assert len(resumed) == restarts, logs[-6000:]
    assert Path(resumed[-1][0]).parent.parent == run_dir  # the same run directory
    steps = [int(step) for _, step in resumed]
    assert steps == sorted(steps) and steps[0] > 0, steps  # every attempt resumed where the one before stopped
    if max_steps is None:
        # a run that ends on trainer.max_time: the last requeue may find its 40 s clock (kept in the checkpoint)
        # already spent and stop at once, so only an earlier resumed attempt must have trained on
        assert steps[0] < final_step and steps[-1] <= final_step, (steps, final_step)
    else:
        assert steps[-1] < final_step, (steps, final_step)  # resumed, then trained on
    # one W&B run, continued; the interrupted attempt was marked preempting and finished
    assert wandb_run_ids(run_dir) == {run_id(run_dir)}
    attempts = [wandb_record_types(f) for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))]
    assert len(attempts) >= 2, attempts
    assert any("preempting" in kinds and "exit" in kinds for kinds in attempts[:-1]), attempts
    assert "exit" in attempts[-1] and "history" in attempts[-1]
    # the submitter got the final attempt's result: COMPLETED, its objective = the final val/loss
    outcome, ret = submitit_result(sweep, job)
    assert outcome == "success" and ret.status == JobStatus.COMPLETED, (outcome, ret)
    assert ret.return_value == pytest.approx(metrics["val/loss"])
    return attempts


def _submit_and_interrupt(tmp_path: Path, cluster: dict[str, str], max_steps: int, interrupt: list[str],
                          *extra: str) -> tuple[Path, str, subprocess.Popen[bytes], Path]:
    """Submit a 1-job multirun; once step 50's checkpoint exists, run ``interrupt`` + [job id]."""
    sweep = tmp_path / "sweep"
    log_file = tmp_path / "submitter.log"
    proc = _start(_args(max_steps, "callbacks.model_checkpoint.every_n_train_steps=50", *extra,
                        f"hydra.sweep.dir={sweep}"), _env(tmp_path, cluster), log_file)
    wait_until(lambda: len(job_ids(sweep)) == 1, 120, "the job's submission", proc, log_file)
    job = job_ids(sweep)[0]
    wait_until(lambda: (sweep / "0" / "checkpoints" / "step_0000050.ckpt").exists(), 240, "step 50", proc,
               log_file)
    subprocess.run([*interrupt, job], env={**train_env(tmp_path), **cluster}, check=True, timeout=30)
    return sweep, job, proc, log_file


def _wait_submitter(proc: subprocess.Popen[bytes], log_file: Path, timeout: float) -> str:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"submitter still waiting after {timeout} s:\n"
                             f"{log_file.read_text(errors='replace')[-5000:]}") from None
    out = log_file.read_text(errors="replace")
    assert proc.returncode == 0, out[-6000:]
    return out


def test_grid_multirun_two_jobs(tmp_path: Path, slurm_cluster: dict[str, str], mnist_available) -> None:
    sweep = tmp_path / "sweep"
    run_train([*_args(20), "seed=1,2", f"hydra.sweep.dir={sweep}"], _env(tmp_path, slurm_cluster), timeout=400)
    jobs = job_ids(sweep)
    assert len(jobs) == 2, jobs  # one array, two tasks
    ids = set()
    for job, (num, seed) in zip(jobs, (("0", 1), ("1", 2)), strict=True):
        d = sweep / num
        assert json.loads((d / "metrics.json").read_text())["global_step"] == 20
        assert OmegaConf.load(d / ".hydra" / "config.yaml").seed == seed
        assert wandb_run_ids(d) == {run_id(d)}
        ids |= wandb_run_ids(d)
        assert finished_job(job, slurm_cluster).get("JobState") == "COMPLETED"
        assert "Traceback" not in job_logs(sweep, job)
    assert len(ids) == 2


def test_preemption_with_warning_requeues_and_resumes(tmp_path: Path, slurm_cluster: dict[str, str],
                                                      mnist_available) -> None:
    """``scancel --signal=USR2``: what SLURM sends before a preemption (preempt_send_user_signal)."""
    max_steps = 200
    sweep, job, proc, log_file = _submit_and_interrupt(tmp_path, slurm_cluster, max_steps,
                                                       ["scancel", "--signal=USR2"])
    _wait_submitter(proc, log_file, 300)
    attempts = _check_final(sweep, job, max_steps, slurm_cluster)
    # wandb-core was alive when the run was marked and finished: the first attempt's records are all there
    assert len(attempts) == 2 and {"history", "preempting", "exit"} <= set(attempts[0]), attempts
    logs = job_logs(sweep, job)
    assert "Received SIGUSR2: checkpointing at global step" in logs
    assert "this job is preempted" in logs  # submitit's handler, not Lightning's auto-requeue
    assert not list((sweep / "0").glob("hpc_ckpt_*.ckpt"))


def test_preemption_without_warning_sigterm(tmp_path: Path, slurm_cluster: dict[str, str],
                                            mnist_available) -> None:
    """``scontrol requeue``: SIGTERM to every process of the job step (wandb-core too), no warning."""
    max_steps = 200
    sweep, job, proc, log_file = _submit_and_interrupt(tmp_path, slurm_cluster, max_steps, ["scontrol", "requeue"])
    _wait_submitter(proc, log_file, 300)
    attempts = _check_final(sweep, job, max_steps, slurm_cluster)
    # wandb-core died with the SIGTERM; the run was re-attached through a fresh one, marked and finished there
    # (the killed core's unwritten records are lost: wandb issue 9963; the CSV log has every step)
    assert len(attempts) == 3 and {"preempting", "exit"} <= set(attempts[1]), attempts
    logs = job_logs(sweep, job)
    assert "Received SIGTERM: checkpointing at global step" in logs
    assert "re-attaching the run to mark it preempted" in logs


def test_time_limit_requeues_and_finishes(tmp_path: Path, slurm_cluster: dict[str, str], mnist_available) -> None:
    """``timeout_min=1``: USR2 comes ``signal_delay_s`` = 20 s before the limit (SLURM may send it up to a minute
    early, so an attempt may train anywhere from 0 to ~35 s); the job checkpoints and submitit requeues it as a
    time-out (counted against ``max_num_timeout``). The training itself is 40 s of ``trainer.max_time`` (Lightning
    keeps that clock in the checkpoint), so the first attempt never finishes it and a requeued one does."""
    sweep = tmp_path / "sweep"
    log_file = tmp_path / "submitter.log"
    proc = _start(_args(100_000, "trainer.max_time=00:00:00:40", "callbacks.model_checkpoint.every_n_train_steps=100",
                        "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=20",
                        "hydra.launcher.max_num_timeout=4", f"hydra.sweep.dir={sweep}"),
                  _env(tmp_path, slurm_cluster), log_file)
    _wait_submitter(proc, log_file, 500)
    job = job_ids(sweep)[0]
    restarts = int(scontrol_job(job, slurm_cluster)["Restarts"])
    assert restarts >= 1
    _check_final(sweep, job, None, slurm_cluster, restarts=restarts)
    logs = job_logs(sweep, job)
    assert "this job is timed-out" in logs and "remaining timeouts)" in logs
    assert "Time limit reached" in logs


SLURM_SEARCH = """\
# @package _global_
defaults:
  - override /hydra/sweeper: atelier_optuna
  - override /hydra/sweeper/sampler: random
optimized_metric: val/loss
hydra:
  sweeper:
    storage: sqlite:///{db}
    study_name: slurm_study
    direction: minimize
    n_trials: 3
    n_jobs: 3
    max_failure_rate: 1.0
    sampler:
      seed: 6
    params:
      model.net.norm_num_groups: choice(8, 3)
"""


def test_optuna_sweep_on_slurm_with_a_failed_and_a_preempted_trial(tmp_path: Path, slurm_cluster: dict[str, str],
                                                                   mnist_available) -> None:
    """3 trials as one SLURM array: norm_num_groups=3 raises (16 channels), the random sampler's seed 6 draws
    8, 8, 3; trial 0 is preempted (USR2) once it has a checkpoint and counts as COMPLETE after its requeued
    attempt finishes, with that attempt's val/loss as its value."""
    import optuna

    db = tmp_path / "study.db"
    search_dir = tmp_path / "configs" / "hparams_search"
    search_dir.mkdir(parents=True)
    (search_dir / "slurm_search.yaml").write_text(SLURM_SEARCH.format(db=db))
    args = [a for a in _args(200, "callbacks.model_checkpoint.every_n_train_steps=50")
            if not a.startswith("model.net.norm_num_groups=")]
    sweep = tmp_path / "sweep"
    log_file = tmp_path / "submitter.log"
    proc = _start([*args, "hparams_search=slurm_search", f"hydra.searchpath=[file://{tmp_path / 'configs'}]",
                   f"hydra.sweep.dir={sweep}"], _env(tmp_path, slurm_cluster), log_file)
    wait_until(lambda: len(job_ids(sweep)) == 3, 120, "the array's submission", proc, log_file)
    first = job_ids(sweep)[0]
    wait_until(lambda: (sweep / "0" / "checkpoints" / "step_0000050.ckpt").exists(), 300, "trial 0 at step 50",
               proc, log_file)
    subprocess.run(["scancel", "--signal=USR2", first], env={**train_env(tmp_path), **slurm_cluster}, check=True,
                   timeout=30)
    _wait_submitter(proc, log_file, 500)

    study = optuna.load_study(study_name="slurm_study", storage=f"sqlite:///{db}")
    states = {t.number: t.state for t in study.trials}
    assert sorted(s.name for s in states.values()) == ["COMPLETE", "COMPLETE", "FAIL"], states
    for trial in study.trials:
        ok = trial.params["model.net.norm_num_groups"] == 8
        assert trial.state == (optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL)
        if ok:
            metrics = json.loads((sweep / str(trial.number) / "metrics.json").read_text())
            assert trial.value == pytest.approx(metrics["val/loss"]) and metrics["global_step"] == 200
        else:
            assert "norm_num_groups" in trial.user_attrs["fail_reason"] or "divisible" in \
                trial.user_attrs["fail_reason"], trial.user_attrs
    assert int(finished_job(first, slurm_cluster)["Restarts"]) == 1  # trial 0 was requeued, and completed
    assert len(RESUMED.findall(job_logs(sweep, first))) == 1
    assert (sweep / "optimization_results.yaml").exists()


def test_multirun_of_ddp_jobs(tmp_path: Path, slurm_cluster: dict[str, str], mnist_available) -> None:
    """`-m seed=1,2 trainer=ddp_sim` with 2 SLURM tasks per job: srun starts both ranks of each job, which train
    together (gloo) in that job's directory; one W&B run and rank-0 files per job."""
    sweep = tmp_path / "sweep"
    args = [a for a in _args(4) if a not in ("trainer=cpu", "trainer.precision=32-true")]
    run_train([*args, "trainer=ddp_sim", "trainer.devices=2", "hydra.launcher.tasks_per_node=2", "seed=1,2",
               f"hydra.sweep.dir={sweep}"], _env(tmp_path, slurm_cluster), timeout=400)
    jobs = job_ids(sweep)
    assert len(jobs) == 2, jobs
    for job, num in zip(jobs, ("0", "1"), strict=True):
        d = sweep / num
        assert json.loads((d / "metrics.json").read_text())["global_step"] == 4
        assert wandb_run_ids(d) == {run_id(d)}
        logs = "".join(p.read_text() for p in (sweep / ".submitit" / job).glob("*_log.*"))
        assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs
        assert "Traceback" not in logs
        assert finished_job(job, slurm_cluster).get("JobState") == "COMPLETED"
    assert not (tmp_path / "outputs" / "train").exists() or not list((tmp_path / "outputs" / "train").glob("*/*"))


def test_the_briefs_art_command_on_slurm(tmp_path: Path, slurm_cluster: dict[str, str], art_available) -> None:
    """`python train.py -m experiment=ddpm_art hydra/launcher=slurm trainer=ddp` as far as a CPU cluster allows: the
    real recipe and Hydra's launcher spelling, DDP on 2 CPU processes (trainer=ddp_sim) started by srun, tiny net."""
    sweep = tmp_path / "sweep"
    tiny = [a for a in tiny_args("ddpm", "logger=[wandb,csv]", "trainer.max_steps=4", "trainer.val_check_interval=4",
                                 "callbacks.sample_grid.on_train_end=false", "data.cache=false")
            if not a.startswith(("model=", "data.val_size="))]  # the experiment's model; the art folder has no val_size
    run_train(["-m", "experiment=ddpm_art", "hydra/launcher=slurm", "trainer=ddp_sim", "trainer.devices=2",
               "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0", "hydra.launcher.tasks_per_node=2",
               "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", *tiny, f"hydra.sweep.dir={sweep}"],
              _env(tmp_path, slurm_cluster), timeout=400)
    jobs = job_ids(sweep)
    assert len(jobs) == 1, jobs
    run_dir = sweep / "0"
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 4
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert config.task_name == "ddpm_art" and config.model.num_classes == 3
    assert config.data._target_.endswith("ArtFolderDataModule")
    logs = "".join(p.read_text() for p in (sweep / ".submitit" / jobs[0]).glob("*_log.*"))  # both ranks' logs
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs
    assert "Traceback" not in logs
    assert finished_job(jobs[0], slurm_cluster).get("JobState") == "COMPLETED"
    assert wandb_run_ids(run_dir) == {run_id(run_dir)}
