"""Preemption-safe training: a run killed with SIGKILL resumes from its own last checkpoint when relaunched into
its directory, and a (simulated) SLURM job checkpoints and requeues itself on SIGUSR1 through Lightning's
SLURMEnvironment, then resumes and reaches the same final step and W&B run."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
from pathlib import Path

import pytest
import torch

from atelier.utils.loggers import run_id
from tests.scale_out_utils import run_train, start_train, tiny_args, train_env, wait_for, wandb_run_ids

MAX_STEPS = 60
LONG = ["logger=[wandb,csv]", f"trainer.max_steps={MAX_STEPS}", "trainer.max_epochs=-1",
        "trainer.val_check_interval=20", "trainer.check_val_every_n_epoch=null", "trainer.log_every_n_steps=5",
        "callbacks.sample_grid.on_train_end=false"]


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_kill_9_then_relaunch_resumes_from_last_ckpt(tmp_path: Path, mnist_available) -> None:
    run_dir = tmp_path / "run"
    args = tiny_args("ddpm", *LONG, "callbacks.model_checkpoint.every_n_train_steps=5", f"hydra.run.dir={run_dir}")
    env = train_env(tmp_path / "outputs")
    proc = start_train(args, env, tmp_path / "first.log")
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step_0000010.ckpt").exists(), proc, 240,
                 "the step-10 checkpoint", tmp_path / "first.log")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists(), "the first process finished before it was killed"
    killed_at = _step(last)
    assert 0 < killed_at < MAX_STEPS

    relaunch = run_train(args, env)  # the same command line: same directory, resume=auto
    match = re.search(r"Resuming from the run's own checkpoint (\S+) \(global step (\d+)", relaunch.stdout)
    assert match, relaunch.stdout[-3000:]
    assert int(match.group(2)) >= killed_at > 0
    assert _metrics(run_dir)["global_step"] == MAX_STEPS == _step(last)
    # the resumed run continues the same W&B run (deterministic id from the run directory)
    assert wandb_run_ids(run_dir) == {run_id(run_dir)}
    # resume=never ignores the run's checkpoints: a fresh run again reaches max_steps from step 0
    fresh = run_train([*args, "resume=never", f"trainer.max_steps={MAX_STEPS // 6}"], env)
    assert "Resuming from" not in fresh.stdout
    assert _metrics(run_dir)["global_step"] == MAX_STEPS // 6


def _fake_scontrol(bin_dir: Path, record: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{record}"\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def _slurm_env(tmp_path: Path, record: Path, job_id: str = "4242") -> dict[str, str]:
    """A single-task SLURM job as Lightning's SLURMEnvironment sees it, with a fake `scontrol` on PATH."""
    bin_dir = tmp_path / "bin"
    _fake_scontrol(bin_dir, record)
    return train_env(tmp_path / "outputs", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=job_id,
                     SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NAME="atelier", SLURM_PROCID="0",
                     SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NNODES="1", SLURM_NODELIST="localhost",
                     SLURM_JOB_NUM_NODES="1")


@pytest.mark.slow
def test_sigusr1_on_slurm_checkpoints_requeues_and_resumes(tmp_path: Path, mnist_available) -> None:
    run_dir = tmp_path / "run"
    record = tmp_path / "scontrol_calls.txt"
    env = _slurm_env(tmp_path, record)
    args = tiny_args("ddpm", *LONG, "callbacks.model_checkpoint.every_n_train_steps=5", f"hydra.run.dir={run_dir}")
    proc = start_train(args, env, tmp_path / "job.log")
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step_0000005.ckpt").exists(), proc, 240, "training to start",
                 tmp_path / "job.log")
        proc.send_signal(signal.SIGUSR1)  # what SLURM sends signal_delay_s before the time limit
        wait_for(lambda: record.exists() and hpc.exists(), proc, 60, "hpc checkpoint and scontrol requeue",
                 tmp_path / "job.log")
    finally:
        proc.send_signal(signal.SIGKILL)  # SLURM kills the requeued job
        proc.wait(30)
    assert record.read_text().split() == ["requeue", "4242"]
    assert "SLURM auto-requeueing enabled" in (tmp_path / "job.log").read_text()
    saved = _step(hpc)
    assert saved > 0
    # the requeued job: same command line, same SLURM job id -> same directory, newest checkpoint, same W&B run
    relaunch = run_train(args, env)
    match = re.search(r"Resuming from the run's own checkpoint (\S+) \(global step (\d+)", relaunch.stdout)
    assert match, relaunch.stdout[-3000:]
    assert int(match.group(2)) >= saved
    assert _metrics(run_dir)["global_step"] == MAX_STEPS
    assert wandb_run_ids(run_dir) == {run_id(run_dir)}


def test_sigterm_saves_a_checkpoint_to_resume_from(tmp_path: Path, mnist_available) -> None:
    """Outside SLURM (or a preemption without warning): SIGTERM stops after the current step with last.ckpt."""
    run_dir = tmp_path / "run"
    args = tiny_args("ddpm", *LONG, "logger=csv", "callbacks.model_checkpoint.every_n_train_steps=1000",
                     f"hydra.run.dir={run_dir}")
    proc = start_train(args, train_env(tmp_path / "outputs"), tmp_path / "job.log")
    try:
        wait_for(lambda: "train/loss" in (run_dir / "csv" / "metrics.csv").read_text()
                 if (run_dir / "csv" / "metrics.csv").exists() else False, proc, 240, "the first logged steps",
                 tmp_path / "job.log")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.exists(), (tmp_path / "job.log").read_text()[-3000:]
    assert 0 < _step(last) < MAX_STEPS
    assert not (run_dir / "metrics.json").exists()
