"""Preemption-safe training outside a scheduler: a run killed with SIGKILL resumes from its own last checkpoint
when relaunched into its directory; SIGTERM and the warning signal (USR2) stop it at the next step with a
checkpoint and a W&B run marked preempted. The same on a real SLURM cluster, with requeueing: tests/test_slurm.py."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import torch

from atelier.utils.loggers import run_id
from tests.scale_out_utils import run_train, start_train, tiny_args, train_env, wait_for, wandb_run_ids
from tests.slurm_utils import wandb_record_types

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


def _signal_after_first_steps(args: list[str], env: dict[str, str], run_dir: Path, log_file: Path,
                              signum: int) -> subprocess.Popen[bytes]:
    """Start a training, send ``signum`` once it has logged its first steps, wait for it to exit."""
    proc = start_train(args, env, log_file)
    try:
        wait_for(lambda: "train/loss" in (run_dir / "csv" / "metrics.csv").read_text()
                 if (run_dir / "csv" / "metrics.csv").exists() else False, proc, 240, "the first logged steps",
                 log_file)
        proc.send_signal(signum)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc


def test_sigterm_saves_a_checkpoint_to_resume_from(tmp_path: Path, mnist_available) -> None:
    """Outside SLURM (or a preemption without warning): SIGTERM stops after the current step with last.ckpt."""
    run_dir = tmp_path / "run"
    args = tiny_args("ddpm", *LONG, "logger=csv", "callbacks.model_checkpoint.every_n_train_steps=1000",
                     f"hydra.run.dir={run_dir}")
    _signal_after_first_steps(args, train_env(tmp_path / "outputs"), run_dir, tmp_path / "job.log", signal.SIGTERM)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.exists(), (tmp_path / "job.log").read_text()[-3000:]
    assert 0 < _step(last) < MAX_STEPS
    assert not (run_dir / "metrics.json").exists()
    assert "Received SIGTERM: checkpointing at global step" in (tmp_path / "job.log").read_text()


def test_warning_signal_without_submitit_checkpoints_and_stops(tmp_path: Path, mnist_available) -> None:
    """USR2 (submitit's signal) on a plain run: checkpoint at the next step, W&B marked preempting and finished
    while wandb-core is alive, exit (no submitit to requeue), and a relaunch resumes to max_steps."""
    run_dir = tmp_path / "run"
    args = tiny_args("ddpm", *LONG, "callbacks.model_checkpoint.every_n_train_steps=1000", f"hydra.run.dir={run_dir}")
    env = train_env(tmp_path / "outputs")
    proc = _signal_after_first_steps(args, env, run_dir, tmp_path / "job.log", signal.SIGUSR2)
    log_text = (tmp_path / "job.log").read_text()
    assert proc.returncode == 128 + signal.SIGUSR2, log_text[-3000:]
    assert "Traceback" not in log_text, log_text[-3000:]
    stopped_at = _step(run_dir / "checkpoints" / "last.ckpt")
    assert 0 < stopped_at < MAX_STEPS
    kinds = wandb_record_types(next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")))
    assert {"history", "preempting", "exit"} <= set(kinds), kinds
    relaunch = run_train(args, env)
    match = re.search(r"Resuming from the run's own checkpoint (\S+) \(global step (\d+)", relaunch.stdout)
    assert match and int(match.group(2)) == stopped_at, relaunch.stdout[-3000:]
    assert _metrics(run_dir)["global_step"] == MAX_STEPS
    assert wandb_run_ids(run_dir) == {run_id(run_dir)}
