"""End to end: evaluate.py on tiny checkpoints of every family, the classifier training config, and the
in-training FID callback (logs val/fid, usable as checkpoint monitor and sweep objective)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from atelier.tasks import evaluate, train
from atelier.utils.precision import cpu_bf16_pays
from tests.conftest import ROOT, compose_cfg

TINY_RUN = ["trainer.max_steps=2", "trainer.limit_val_batches=1", "export_pipeline=false"]
CLASSIFIER = ["model=classifier", "data.image_size=32", "data.batch_size=16", "logger=csv", "print_config=false",
              "callbacks.sample_grid=null", "~callbacks.rich_progress_bar", "~callbacks.model_summary",
              "model.net.width=4", "model.net.feature_dim=16", "trainer.max_steps=3", "trainer.limit_val_batches=2",
              "trainer.val_check_interval=3", "trainer.check_val_every_n_epoch=null"]


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory: pytest.TempPathFactory, mnist_available: Path) -> Path:
    """A 3-step MNIST classifier run (the real config); its test/acc is computed on the 10k test split."""
    out = tmp_path_factory.mktemp("classifier")
    metrics = train.run(compose_cfg("train", CLASSIFIER, out))
    assert 0.0 <= metrics["test/acc"] <= 1.0 and "val/acc" in metrics
    assert json.loads((out / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]
    return out / "checkpoints" / "last.ckpt"


def eval_cfg(ckpt: Path, out: Path, clf: Path | None, *overrides: str) -> DictConfig:
    """An evaluate config for ``ckpt`` writing into ``out/eval``; ``clf``: the classifier (None for Inception)."""
    extractor = [f"feature_extractor.ckpt_path={clf}"] if clf is not None else []
    return compose_cfg("evaluate", [f"ckpt_path={ckpt}", *extractor, "num_samples=24", "reference_size=64",
                                    "batch_size=10", "is_splits=2", "kid_subsets=5", f"cache_dir={out / 'cache'}",
                                    "logger=[]", *overrides], out / "eval")


@pytest.mark.parametrize("family", ["ddpm", "gan", "vae"])
def test_evaluate_each_family(family: str, train_cfg: Callable[..., DictConfig], tmp_path: Path,
                              classifier_ckpt: Path) -> None:
    train.run(train_cfg(*TINY_RUN, model=family))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    extra = ["sampler=ddim", "num_inference_steps=2"] if family == "ddpm" else ["sampler=ddim"]  # ignored: GAN/VAE
    result = evaluate.run(eval_cfg(ckpt, tmp_path, classifier_ckpt, *extra))
    m = result["metrics"]
    assert all(math.isfinite(m[k]) for k in ("fid", "kid", "is", "class_coverage"))
    assert sum(m["class_histogram"]) == 24 and m["kid_subset_size"] == 24
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    p = written["protocol"]
    assert p["num_samples"] == 24 and p["reference_size"] == 64 and p["reference_split"] == "test"
    assert p["antialias"] is False and p["dtype"] == "float64" and p["extractor"] == "mnist_classifier"
    assert p["weights"] == str(classifier_ckpt) and len(p["weights_sha256"]) == 16
    assert p["dataset"]["name"] == "MNISTDataModule" and p["dataset"]["image_size"] == 32
    # autocast=true (the default) is recorded as what it resolved to on this CPU: bf16 only with AMX
    expected = {"sampler": "ddim", "num_inference_steps": 2, "autocast": cpu_bf16_pays()}
    assert p["sampling"] == (expected if family == "ddpm" else {})
    assert written["params"] > 0 and written["model"] == {"ddpm": "DDPM", "gan": "GAN", "vae": "VAE"}[family]
    assert result["reference_cache_hit"] is False
    again = evaluate.run(eval_cfg(ckpt, tmp_path, classifier_ckpt, *extra))
    assert again["reference_cache_hit"] is True and again["metrics"]["fid"] == pytest.approx(m["fid"])


def test_evaluate_logs_to_wandb_offline(train_cfg: Callable[..., DictConfig], tmp_path: Path,
                                        classifier_ckpt: Path) -> None:
    train.run(train_cfg(*TINY_RUN, model="vae"))
    cfg = eval_cfg(tmp_path / "checkpoints" / "last.ckpt", tmp_path, classifier_ckpt, "logger=[wandb,csv]",
                   "metrics=[fid]")
    evaluate.run(cfg)
    runs = list((tmp_path / "eval" / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))
    rows = list(csv.DictReader((tmp_path / "eval" / "csv" / "metrics.csv").read_text().splitlines()))
    assert float(rows[0]["eval/fid"]) > 0


def test_evaluate_errors_name_the_key(train_cfg: Callable[..., DictConfig], tmp_path: Path,
                                      classifier_ckpt: Path) -> None:
    train.run(train_cfg(*TINY_RUN, model="vae"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=r"feature_extractor\.ckpt_path"):
        evaluate.run(eval_cfg(ckpt, tmp_path, tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match=r"kid_subset_size=100 is larger than the 24 generated"):
        evaluate.run(eval_cfg(ckpt, tmp_path, classifier_ckpt, "kid_subset_size=100"))
    with pytest.raises(ValueError, match=r"metrics=\['fid', 'psnr'\] is not allowed"):
        evaluate.run(eval_cfg(ckpt, tmp_path, classifier_ckpt, "metrics=[fid,psnr]"))


def test_reference_image_size_rebuilds_the_reference_at_that_size(train_cfg: Callable[..., DictConfig],
                                                                  tmp_path: Path, classifier_ckpt: Path) -> None:
    train.run(train_cfg(*TINY_RUN, model="vae"))  # trained at 32 px
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    result = evaluate.run(eval_cfg(ckpt, tmp_path, classifier_ckpt, "metrics=[fid]", "reference_image_size=28"))
    assert math.isfinite(result["metrics"]["fid"])
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["protocol"]["dataset"]["image_size"] == 28


def test_fid_callback_logs_val_fid_as_monitor_and_objective(train_cfg: Callable[..., DictConfig], tmp_path: Path,
                                                             classifier_ckpt: Path) -> None:
    cfg = train_cfg("callbacks=[default,fid]", f"callbacks.fid.feature_extractor.ckpt_path={classifier_ckpt}",
                    "callbacks.fid.num_samples=16", "callbacks.fid.reference_size=48", "callbacks.fid.every_n_steps=2",
                    "callbacks.fid.batch_size=8", f"callbacks.fid.cache_dir={tmp_path / 'cache'}",
                    "+callbacks.model_checkpoint.monitor=val/fid", "+callbacks.model_checkpoint.mode=min",
                    "callbacks.model_checkpoint.save_top_k=1", "callbacks.model_checkpoint.every_n_train_steps=2",
                    "optimized_metric=val/fid", "trainer.max_steps=4", "trainer.limit_val_batches=0",
                    "export_pipeline=false", model="vae")
    metrics = train.run(cfg)
    assert math.isfinite(metrics["val/fid"]) and math.isfinite(metrics["val/kid"])
    assert train.metric_value(metrics, cfg.optimized_metric) == metrics["val/fid"]
    rows = [r for r in csv.DictReader((tmp_path / "csv" / "metrics.csv").read_text().splitlines()) if r.get("val/fid")]
    assert [int(r["step"]) for r in rows] == [2, 4]  # every 2 optimiser steps
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # reference statistics computed once
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    monitored = [v for k, v in state.items() if k.startswith("ModelCheckpoint") and "val/fid" in k]
    fids = [float(r["val/fid"]) for r in rows]
    assert monitored and float(monitored[0]["best_model_score"]) == pytest.approx(min(fids))


@pytest.mark.slow
def test_evaluate_with_inception_random_weights(train_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    train.run(train_cfg(*TINY_RUN, model="vae"))
    cfg = eval_cfg(tmp_path / "checkpoints" / "last.ckpt", tmp_path, None, "feature_extractor=inception",
                   "feature_extractor.random_weights=true", "num_samples=4", "reference_size=4", "batch_size=4")
    result = evaluate.run(cfg)
    p = result["protocol"]
    assert p["extractor"] == "inception" and p["input_size"] == 299 and p["num_features"] == 2048
    assert "TF1" in p["resize"] and p["antialias"] is False
    assert "class_histogram" not in result["metrics"] and math.isfinite(result["metrics"]["fid"])


def test_guidance_sweep_script_writes_table_csv_and_plot(train_cfg: Callable[..., DictConfig], tmp_path: Path,
                                                         classifier_ckpt: Path) -> None:
    train.run(train_cfg(*TINY_RUN, "model.num_classes=10", "callbacks.sample_grid=null"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    result = evaluate.run(eval_cfg(ckpt, tmp_path, classifier_ckpt, "num_inference_steps=2", "guidance_scale=2",
                                   "metrics=[fid]"))
    assert 0.0 <= result["metrics"]["cond_accuracy"] <= 1.0  # balanced labels, checked by the classifier
    assert result["protocol"]["sampling"] == {"num_inference_steps": 2, "guidance_scale": 2,
                                              "autocast": cpu_bf16_pays(), "label_distribution": "balanced"}
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "scripts" / "guidance_sweep.py"), str(ckpt), "--scales", "0,2",
           "--steps", "2", "--num-samples", "20", "--batch-size", "10", "--reference-size", "40",
           "--metrics", "fid", "--classifier-ckpt", str(classifier_ckpt), "--cache-dir", str(tmp_path / "cache"),
           "--baseline", str(ckpt), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader((out / "guidance_sweep.csv").read_text().splitlines()))
    assert [r["guidance_scale"] for r in rows] == ["0.0", "2.0", ""]
    assert all(0.0 <= float(r["cond_accuracy"]) <= 1.0 for r in rows[:2]) and rows[2]["cond_accuracy"] == ""
    assert all(math.isfinite(float(r["fid"])) for r in rows)
    # the baseline row (the same checkpoint at its default guidance_scale=1, default labels) is its own sample set
    assert Image.open(out / "guidance_sweep.png").size[0] > 300
    record = json.loads((out / "guidance_sweep.json").read_text())
    assert record["protocol"]["num_samples"] == 20 and record["protocol"]["extractor"] == "mnist_classifier"
    assert "| conditional | 2 |" in done.stdout and "| unconditional baseline | – |" in done.stdout
