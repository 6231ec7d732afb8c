"""The histogram-matching control (Kynkäänniemi et al. 2023): subsets follow the target histogram, clusters are
found, a skewed pool of real digits scores better once matched, and the script runs on a real checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torchvision.datasets import MNIST

from atelier.data.mnist import MNISTDataModule
from atelier.metrics.evaluator import Evaluator
from atelier.metrics.histogram_match import (
    StoredImages,
    fit_reference_clusters,
    histogram_control,
    matched_subset,
)
from atelier.tasks import train
from tests.conftest import ROOT


def test_matched_subset_follows_the_target_histogram_without_repeats() -> None:
    assign = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)  # pool skewed towards class 0
    target = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    picked = matched_subset(assign, target, 300, torch.Generator().manual_seed(0))
    assert picked.shortfall == 0 and picked.indices.numel() == 300
    assert picked.indices.unique().numel() == 300  # each pool image at most once
    assert torch.bincount(assign[picked.indices], minlength=3).tolist() == [60, 90, 150]
    again = matched_subset(assign, target, 300, torch.Generator().manual_seed(0))
    assert torch.equal(again.indices, picked.indices)  # same generator state, same subset


def test_matched_subset_fills_a_shortfall_at_random_and_checks_its_input() -> None:
    assign = torch.tensor([0] * 95 + [1] * 5)
    picked = matched_subset(assign, torch.tensor([0.5, 0.5], dtype=torch.float64), 40)
    assert picked.shortfall == 15 and picked.indices.unique().numel() == 40
    assert int((assign[picked.indices] == 1).sum()) == 5  # every image of the rare class is used
    with pytest.raises(ValueError, match="pool size"):
        matched_subset(assign, torch.tensor([0.5, 0.5]), 101)
    with pytest.raises(ValueError, match="sum to 1"):
        matched_subset(assign, torch.tensor([0.5, 0.6]), 10)
    with pytest.raises(ValueError, match=r"cluster ids must lie in \[0, 2\)"):
        matched_subset(torch.tensor([0, 3]), torch.tensor([0.5, 0.5]), 1)


def test_reference_clusters_find_separated_groups_and_their_shares() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [60, 30, 10]
    points = torch.cat([c + 0.3 * torch.randn(n, 2, generator=g) for c, n in zip(centres, sizes, strict=True)])
    clusters = fit_reference_clusters(points, 3, seed=0)
    assert sorted(round(float(f), 2) for f in clusters.frequencies) == [0.1, 0.3, 0.6]
    ids = clusters.assign(points)
    for start, n in ((0, 60), (60, 30), (90, 10)):  # each group in one cluster of its own
        assert ids[start:start + n].unique().numel() == 1
    assert ids[[0, 60, 90]].unique().numel() == 3
    with pytest.raises(ValueError, match="num_clusters=1"):
        fit_reference_clusters(points, 1)


def test_stored_images_hand_out_in_order_and_refuse_to_run_over() -> None:
    images = torch.arange(5.0).view(5, 1, 1, 1)
    stored = StoredImages(images)
    assert stored.sample(3).flatten().tolist() == [0, 1, 2] and stored.sample(2).flatten().tolist() == [3, 4]
    with pytest.raises(ValueError, match="asked for 1 images at position 5 of 5"):
        stored.sample(1)


def test_matching_a_skewed_pool_of_real_digits_lowers_fid(mnist_available: Path) -> None:
    """Real training digits drawn with a skewed mix (three quarters ones) against the test split: the matched
    subset restores the digit mix, so its FID must fall well below the random subset's."""
    torch.set_num_threads(1)
    train_set = MNIST(str(mnist_available), train=True, download=False)
    g = torch.Generator().manual_seed(0)
    ones = torch.nonzero(train_set.targets == 1).flatten()
    others = torch.nonzero(train_set.targets != 1).flatten()
    pick = torch.cat([ones[torch.randperm(ones.numel(), generator=g)[:1500]],
                      others[torch.randperm(others.numel(), generator=g)[:500]]])
    pool = train_set.data[pick].unsqueeze(1)  # (2000, 1, 28, 28) uint8
    datamodule = MNISTDataModule(str(mnist_available), image_size=28, val_size=2000)
    evaluator = Evaluator({"name": "mnist_classifier"}, datamodule, ["fid", "kid"], num_samples=400,
                          reference_size=2000, batch_size=500)
    features = evaluator.features(pool[:10])
    assert features.shape == (10, evaluator.reference().features.shape[1]) and features.dtype == torch.float32
    result = histogram_control(evaluator, pool, num_clusters=10, seed=0)
    assert result["pool_size"] == 2000 and len(result["reference_histogram"]) == 10
    assert math.isclose(sum(result["pool_histogram"]), 1.0, abs_tol=1e-3)
    assert result["shortfall"] < 40
    random_fid, matched_fid = result["random"]["fid"], result["matched"]["fid"]
    assert matched_fid < 0.5 * random_fid, (random_fid, matched_fid)
    with pytest.raises(ValueError, match="the pool has 10 images"):
        histogram_control(evaluator, pool[:10])


def test_histogram_control_script_on_a_trained_gan(train_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    train.run(train_cfg("trainer.max_steps=2", "trainer.limit_val_batches=1", "export_pipeline=false", model="gan"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    out = tmp_path / "control.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "histogram_control.py"), str(ckpt), "--pool", "60",
           "--num-samples", "30", "--clusters", "4", "--reference-size", "100", "--batch-size", "30",
           "--metrics", "fid,kid", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| random |" in done.stdout and "| matched |" in done.stdout
    record = json.loads(out.read_text())
    assert record["pool_size"] == 60 and record["num_clusters"] == 4
    assert all(math.isfinite(record[s]["fid"]) for s in ("random", "matched"))
    assert record["protocol"]["num_samples"] == 30 and record["protocol"]["extractor"] == "mnist_classifier"
    assert record["protocol"]["sampling"] == {}  # an unconditional GAN: no sampler options, no labels
    bad = subprocess.run([*cmd[:3], "--pool", "10", "--num-samples", "30"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--pool=10 must be at least --num-samples=30" in bad.stderr
