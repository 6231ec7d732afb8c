"""Helpers for the scale-out tests: run ``train.py`` as a real subprocess (DDP, sweeps, launchers, signals need
the entry point, not ``tasks.train.run``) with tiny models and offline W&B."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.conftest import DATA_DIR, ROOT, TINY

# a few tiny, fast steps; no progress bar, no periodic grids, no pipeline export
QUIET = ["print_config=false", "data.num_workers=0", "data.batch_size=8", "data.val_size=64",
         "trainer.limit_val_batches=1", "callbacks.sample_grid.num_samples=4", "callbacks.sample_grid.every_n_steps=0",
         "~callbacks.rich_progress_bar", "~callbacks.model_summary", "export_pipeline=false"]
IMAGE_SIZE = {"ddpm": 8, "gan": 16, "vae": 16}


def tiny_args(model: str = "ddpm", *extra: str) -> list[str]:
    """Command-line overrides of a tiny ``model`` run (the CLI form of ``tests.conftest.TINY``)."""
    return [f"model={model}", *TINY[model], f"data.image_size={IMAGE_SIZE.get(model, 16)}", *QUIET, *extra]


def train_env(output_root: Path, **extra: str) -> dict[str, str]:
    """Environment of a ``train.py`` subprocess: real data, outputs under ``output_root``, offline W&B."""
    env = dict(os.environ)
    env.update(ATELIER_DATA_DIR=str(DATA_DIR), ATELIER_OUTPUT_DIR=str(output_root), WANDB_MODE="offline",
               WANDB_SILENT="true", HYDRA_FULL_ERROR="1", PYTHONUNBUFFERED="1")
    # WANDB_SERVICE (set once this pytest process has used W&B) would attach the child to this process's wandb-core,
    # which outlives a killed child and then refuses its run id ("run ID ... is in use") on relaunch
    for name in ("LOCAL_RANK", "RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "WANDB_SERVICE"):
        env.pop(name, None)
    env.update(extra)
    return env


def run_train(args: Sequence[str], env: dict[str, str], timeout: float = 300,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python train.py <args>`` to completion; on a non-zero exit (``check``) fail with its output tail."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


def start_train(args: Sequence[str], env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    """Start ``python train.py <args>`` in the background, output to ``log_file``."""
    out = open(log_file, "wb")  # noqa: SIM115 (closed by the OS when the child exits; the test reads the file)
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[bytes] | None, timeout: float,
             what: str, log_file: Path | None = None) -> None:
    """Poll ``condition`` every 50 ms until true; fail when ``timeout`` s pass or ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        tail = log_file.read_text(errors="replace")[-4000:] if log_file and log_file.exists() else ""
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before: {what}\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}\n{tail}")
        time.sleep(0.05)


def wandb_run_ids(run_dir: Path) -> set[str]:
    """Ids of the W&B runs under ``run_dir/wandb`` (offline dirs are ``offline-run-<time>-<id>``)."""
    return {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
