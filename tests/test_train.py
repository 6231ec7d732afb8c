"""The train and sample tasks end to end on real data with a tiny UNet."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atelier.tasks import sample as sample_task
from atelier.tasks import train as train_task
from tests.conftest import ROOT, TINY_DDPM, compose_cfg

SHORT = ["trainer.limit_train_batches=5", "trainer.limit_val_batches=1", "data.val_size=64",
         "callbacks.model_checkpoint.every_n_train_steps=null", "trainer.log_every_n_steps=1"]


@pytest.mark.parametrize("data", ["mnist", "art"])
def test_fast_dev_run_each_data_model_pair(train_cfg, mnist_available, data: str) -> None:
    cfg = train_cfg(f"data={data}", "data.image_size=16", "debug=fdr")
    metrics = train_task.run(cfg)
    assert metrics["global_step"] == 1
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    out = Path(cfg.paths.output_dir)
    assert (out / "samples" / "final.png").is_file()
    assert json.loads((out / "run_info.json").read_text())["seed"] == 42


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_resume_matches_uninterrupted_run(tmp_path: Path, mnist_available) -> None:
    common = [*TINY_DDPM, *SHORT, "logger=csv", "print_config=false", "data.image_size=8", "data.batch_size=8",
              "callbacks.sample_grid.every_n_steps=0", "callbacks.sample_grid.on_train_end=false",
              "~callbacks.rich_progress_bar", "export_pipeline=false"]
    full = compose_cfg("train", [*common, "trainer.max_epochs=2"], tmp_path / "full")
    half = compose_cfg("train", [*common, "trainer.max_epochs=1"], tmp_path / "half")
    m_full = train_task.run(full)
    train_task.run(half)
    resumed = compose_cfg("train", [*common, "trainer.max_epochs=2",
                                    f"ckpt_path={tmp_path / 'half' / 'checkpoints' / 'last.ckpt'}"],
                          tmp_path / "resumed")
    m_res = train_task.run(resumed)

    assert m_full["global_step"] == m_res["global_step"] == 10
    assert m_res["train/loss"] == pytest.approx(m_full["train/loss"], rel=1e-5)
    a, b = _state(tmp_path / "full/checkpoints/last.ckpt"), _state(tmp_path / "resumed/checkpoints/last.ckpt")
    assert a.keys() == b.keys()
    assert any(k.startswith("ema.module.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # the EMA has moved away from the raw weights, so the check above covers it separately
    assert not torch.allclose(a["ema.module.conv_in.weight"], a["net.conv_in.weight"])


def test_offline_wandb_run_leaves_files(train_cfg, mnist_available) -> None:
    cfg = train_cfg("logger=[wandb,csv]", "data.image_size=8", *SHORT, "trainer.max_steps=3",
                    "callbacks.sample_grid.every_n_steps=2")
    train_task.run(cfg)
    out = Path(cfg.paths.output_dir)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    events = list(runs[0].glob("run-*.wandb"))
    assert events and events[0].stat().st_size > 0, "no W&B event file"
    # the sample grid was logged as a W&B image
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert (out / "samples" / "step_0000002.png").is_file()
    metrics = (out / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "lr" in metrics


def test_wrong_config_value_names_the_key(train_cfg) -> None:
    cfg = train_cfg("model.beta_schedule=cosine", "debug=fdr")
    with pytest.raises(Exception, match=r"model\.beta_schedule='cosine'.*squaredcos_cap_v2"):
        train_task.run(cfg)


def test_missing_data_dir_names_the_path(train_cfg, tmp_path: Path) -> None:
    cfg = train_cfg(f"data.data_dir={tmp_path / 'no_mnist_here'}", "data.download=false", "debug=fdr")
    with pytest.raises(FileNotFoundError, match="no_mnist_here"):
        train_task.run(cfg)
    cfg = train_cfg("data=art", f"data.root={tmp_path / 'no_art_here'}", "debug=fdr")
    with pytest.raises(FileNotFoundError, match=r"data\.root=.*no_art_here"):
        train_task.run(cfg)


def test_sample_task_from_checkpoint(train_cfg, tmp_path: Path, mnist_available) -> None:
    cfg = train_cfg("data.image_size=8", *SHORT, "trainer.max_steps=2")
    train_task.run(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    scfg = compose_cfg("sample", [f"ckpt_path={ckpt}", "num_samples=6", "sampler=ddim", "num_inference_steps=3"],
                       tmp_path / "sample")
    info = sample_task.run(scfg)
    assert info["shape"] == [6, 1, 8, 8]
    assert (tmp_path / "sample" / "grid.png").is_file()
    assert len(list((tmp_path / "sample" / "images").glob("*.png"))) == 6
    # same seed, same images: the sampler is deterministic given the generator
    model = sample_task.load_module(ckpt)
    a = model.sample(2, generator=torch.Generator().manual_seed(0), num_inference_steps=3)
    b = model.sample(2, generator=torch.Generator().manual_seed(0), num_inference_steps=3)
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        sample_task.load_module(tmp_path / "missing.ckpt")


def test_edm_trains_exports_and_samples_from_its_checkpoint(train_cfg, tmp_path: Path, mnist_available) -> None:
    cfg = train_cfg("data.image_size=8", *SHORT, "trainer.max_steps=3", "model.parameterization=edm",
                    "model.sampler=edm_heun", "export_pipeline=true")
    metrics = train_task.run(cfg)
    assert metrics["global_step"] == 3 and torch.isfinite(torch.tensor(metrics["train/loss"]))
    out = Path(cfg.paths.output_dir)
    assert (out / "samples" / "final.png").is_file()
    assert {p.name for p in (out / "pipeline").iterdir()} >= {"unet", "scheduler"}
    ckpt = out / "checkpoints" / "last.ckpt"
    scfg = compose_cfg("sample", [f"ckpt_path={ckpt}", "num_samples=4", "sampler=edm_dpmpp_sde",
                                  "num_inference_steps=3"], tmp_path / "sample")
    assert sample_task.run(scfg)["shape"] == [4, 1, 8, 8]
    model = sample_task.load_module(ckpt)
    assert model.edm is not None and model.hparams.sampler == "edm_heun"
    with pytest.raises(ValueError, match="not an EDM sampler"):
        model.sample(2, sampler="ddim")


@pytest.mark.slow
def test_entry_points_write_a_run_directory(tmp_path: Path, mnist_available) -> None:
    env = {**os.environ, "ATELIER_OUTPUT_DIR": str(tmp_path)}
    args = [sys.executable, "train.py", *TINY_DDPM, *SHORT, "data.image_size=8", "trainer.max_steps=3",
            "logger=[wandb,csv]", "print_config=true"]
    subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    (run,) = list((tmp_path / "train").glob("*/*"))
    for name in (".hydra/config.yaml", "train.log", "checkpoints/last.ckpt", "samples/final.png", "metrics.json",
                 "run_info.json", "config_tree.log", "pipeline/model_index.json"):
        assert (run / name).exists(), name
    assert list((run / "wandb").glob("offline-run-*"))
    out = subprocess.run([sys.executable, "sample.py", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                          "num_samples=4", "num_inference_steps=2"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (srun,) = list((tmp_path / "sample").glob("*/*"))
    assert (srun / "grid.png").is_file()
    bad = subprocess.run([sys.executable, "train.py", "model.prediction_type=x0", "debug=fdr"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "model.prediction_type='x0'" in bad.stderr + bad.stdout


@pytest.mark.slow
def test_short_real_training_lowers_the_loss(train_cfg, mnist_available) -> None:
    """300 real steps on MNIST: the training loss falls well below its start and val/loss (fixed noise) falls."""
    cfg = train_cfg("data.image_size=16", "data.batch_size=32", "data.val_size=256", "trainer.max_steps=300",
                    "trainer.val_check_interval=100", "trainer.check_val_every_n_epoch=null",
                    "trainer.limit_val_batches=4", "model.optimizer.lr=2e-3", "trainer.log_every_n_steps=1",
                    "callbacks.model_checkpoint.every_n_train_steps=150", "model.net.block_out_channels=[16,32,32]")
    train_task.run(cfg)
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(train) >= 290 and len(val) == 3, (len(train), val)
    first, last = sum(train[:10]) / 10, sum(train[-30:]) / 30
    assert last < 0.5 * first, (first, last)
    assert val[-1] < val[0], val
