"""DDP on 2 CPU processes (trainer=ddp_sim, gloo) through the real entry point: one output directory per run
(not per rank), one W&B run, rank-0-only files, for every model family; the in-training FID callback under DDP;
a multirun whose jobs use DDP."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest

from atelier.tasks import train as train_task
from atelier.utils.loggers import run_id
from tests.conftest import compose_cfg
from tests.scale_out_utils import run_train, tiny_args, train_env, wandb_run_ids

DDP = ["trainer=ddp_sim", "logger=[wandb,csv]", "trainer.log_every_n_steps=1"]


def _run_dirs(outputs: Path, task: str = "train") -> list[Path]:
    """Run directories outputs/<task>/<date>/<time> (what Hydra made, for any rank)."""
    return sorted(p for p in (outputs / task).glob("*/*") if p.is_dir() and p.parent.name != "multiruns")


@pytest.mark.parametrize("model", ["ddpm", "gan", "vae"])
def test_ddp_sim_one_run_dir_one_wandb_run(tmp_path: Path, mnist_available, model: str) -> None:
    outputs = tmp_path / "outputs"
    steps = 4  # GAN: 2 optimiser steps (D and G) per batch
    proc = run_train(tiny_args(model, *DDP, f"trainer.max_steps={steps}", "trainer.max_epochs=-1"),
                     train_env(outputs))
    assert "Starting with 2 processes" in proc.stdout or "MEMBER: 2/2" in proc.stdout, proc.stdout[-3000:]
    runs = _run_dirs(outputs)
    assert len(runs) == 1, runs  # rank 1 ran in rank 0's directory (Hydra timestamps would differ otherwise)
    run = runs[0]
    assert (run / "train_ddp_process_1.log").exists()  # rank 1 logged there
    assert wandb_run_ids(run) == {run_id(run)}  # one W&B run, from rank 0
    assert json.loads((run / "metrics.json").read_text())["global_step"] == steps
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "samples" / "final.png").exists()
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").read_text().splitlines()))
    train_rows = [r for r in rows if r.get("train/loss") or r.get("train/d_loss")]
    assert train_rows and len({r["step"] for r in train_rows}) == len(train_rows)  # one logger, one row per step
    info = json.loads((run / "run_info.json").read_text())
    assert not any(a.startswith("hydra.run.dir=") for a in info["argv"])  # written by rank 0, not the child


CLASSIFIER = ["model=classifier", "data.image_size=28", "data.batch_size=16", "logger=csv", "print_config=false",
              "callbacks.sample_grid=null", "~callbacks.rich_progress_bar", "~callbacks.model_summary",
              "model.net.width=4", "model.net.feature_dim=16", "trainer.max_steps=3", "trainer.limit_val_batches=1",
              "trainer.val_check_interval=3", "trainer.check_val_every_n_epoch=null", "export_pipeline=false"]

RANK_LINE = re.compile(r"rank (\d), step (\d+): val/fid=([^,\s]+)")


def test_fid_callback_under_ddp_logged_once_same_on_every_rank(tmp_path: Path, mnist_available) -> None:
    """A tiny GAN (2 optimiser steps per batch): rank 0 samples and measures while rank 1 waits for the
    broadcast; val/fid reaches the loggers once per evaluation, is finite, and rank 1 holds the very number rank 0
    computed (checkpoint monitor on val/fid)."""
    train_task.run(compose_cfg("train", CLASSIFIER, tmp_path / "classifier"))
    classifier = tmp_path / "classifier" / "checkpoints" / "last.ckpt"
    outputs = tmp_path / "outputs"
    run_dir = tmp_path / "run"
    args = tiny_args("gan", *DDP, "trainer.max_steps=4", "trainer.max_epochs=-1",
                     "trainer.limit_val_batches=0", "callbacks=[default,fid]",
                     f"callbacks.fid.feature_extractor.ckpt_path={classifier}", "callbacks.fid.num_samples=16",
                     "callbacks.fid.reference_size=48", "callbacks.fid.every_n_steps=2", "callbacks.fid.batch_size=8",
                     f"callbacks.fid.cache_dir={tmp_path / 'cache'}", "+callbacks.model_checkpoint.monitor=val/fid",
                     "+callbacks.model_checkpoint.mode=min", "callbacks.model_checkpoint.save_top_k=1",
                     "callbacks.model_checkpoint.every_n_train_steps=2", "optimized_metric=val/fid",
                     f"hydra.run.dir={run_dir}")
    run_train(args, train_env(outputs))
    rows = [r for r in csv.DictReader((run_dir / "csv" / "metrics.csv").read_text().splitlines())
            if r.get("val/fid")]
    assert [int(r["step"]) for r in rows] == [2, 4]  # once per evaluation, from rank 0's loggers only
    logged = {int(r["step"]): float(r["val/fid"]) for r in rows}
    assert all(math.isfinite(v) for v in logged.values())
    rank0 = {(int(s), float(v)) for r, s, v in RANK_LINE.findall((run_dir / "train.log").read_text()) if r == "0"}
    rank1 = {(int(s), float(v)) for r, s, v in RANK_LINE.findall((run_dir / "train_ddp_process_1.log").read_text())
             if r == "1"}
    assert rank0 == rank1 == set(logged.items())
    # callback_metrics hold it as a float32 tensor
    assert json.loads((run_dir / "metrics.json").read_text())["val/fid"] == pytest.approx(logged[4], rel=1e-6)


def test_multirun_of_ddp_jobs_on_the_basic_launcher_is_refused_clearly(tmp_path: Path, mnist_available) -> None:
    """Hydra's basic launcher cannot run a second DDP job in the same process: the sweep stops at once with a
    message naming the supported launcher (launcher=slurm; tests/test_slurm.py runs that path), nothing trained."""
    outputs = tmp_path / "outputs"
    proc = run_train(["-m", *tiny_args("ddpm", *DDP, "trainer.max_steps=2", "trainer.max_epochs=-1"), "seed=1,2"],
                     train_env(outputs), check=False)
    assert proc.returncode != 0
    assert "a multirun of DDP jobs" in proc.stdout and "use launcher=slurm" in proc.stdout, proc.stdout[-3000:]
    assert not list(outputs.rglob("metrics.json")) and not list(outputs.rglob("*.ckpt"))
