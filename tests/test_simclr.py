"""SimCLR, the self-supervised art yardstick: the NT-Xent loss, the k-NN diagnostic, a tiny real training run that
lowers its loss, and the extractor that reads its checkpoint (features only, no IS)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from atelier.metrics.art_features import ArtSimCLRFeatures
from atelier.metrics.suite import GenerativeMetrics, build_extractor
from atelier.models.simclr import leave_one_out_knn_accuracy, nt_xent_loss
from atelier.tasks import train
from tests.conftest import compose_cfg


def test_nt_xent_is_low_for_matched_pairs_and_log_2b_minus_1_without_information() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 8, generator=g)
    matched = nt_xent_loss(z, z + 0.01 * torch.randn(16, 8, generator=g), temperature=0.1)
    shuffled = nt_xent_loss(z, z[torch.randperm(16, generator=g)], temperature=0.1)
    assert matched < 0.1 < shuffled
    same = nt_xent_loss(torch.ones(16, 8), torch.ones(16, 8))
    assert math.isclose(float(same), math.log(31), rel_tol=1e-5)  # every other view is as similar
    with pytest.raises(ValueError, match="B ≥ 2"):
        nt_xent_loss(z[:1], z[:1])
    with pytest.raises(ValueError, match="temperature=0"):
        nt_xent_loss(z, z, temperature=0)


def test_knn_accuracy_reads_labels_off_separated_features() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    directions = torch.eye(3, 5)
    features = directions[labels] + 0.05 * torch.randn(60, 5, generator=g)
    assert leave_one_out_knn_accuracy(features, labels, k=5) == 1.0
    noise = torch.randn(60, 5, generator=g)
    assert leave_one_out_knn_accuracy(noise, labels, k=5) < 0.7
    with pytest.raises(ValueError, match="more than k=5"):
        leave_one_out_knn_accuracy(features[:5], labels[:5])


TINY_SIMCLR = ["experiment=art_simclr", "logger=csv", "print_config=false", "data.num_workers=0",
               "data.image_size=32", "data.batch_size=16", "data.cache=false", "model.net.width=4",
               "model.net.feature_dim=16", "~callbacks.time_budget", "trainer.max_time=null", "trainer.max_steps=30",
               "trainer.max_epochs=-1", "trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=30",
               "trainer.limit_val_batches=4", "model.lr_scheduler.num_warmup_steps=2", "trainer.precision=32-true",
               "trainer.log_every_n_steps=1",
               "~callbacks.rich_progress_bar", "~callbacks.model_summary"]


def test_art_simclr_trains_and_its_checkpoint_is_an_extractor(tmp_path: Path, art_available: Path) -> None:
    cfg = compose_cfg("train", [*TINY_SIMCLR, f"paths.log_dir={tmp_path}"], tmp_path)
    metrics = train.run(cfg)
    assert 0.0 <= float(metrics["val/knn_acc"]) <= 1.0 and math.isfinite(float(metrics["val/loss"]))
    rows = csv.DictReader((tmp_path / "csv" / "metrics.csv").read_text().splitlines())
    train_losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    # the contrastive loss goes down (the first five steps against the last five)
    assert len(train_losses) == 30 and sum(train_losses[-5:]) < sum(train_losses[:5]), train_losses
    ckpt = tmp_path / "art_simclr" / "classifier.ckpt"
    assert ckpt.is_file()
    extractor = build_extractor({"name": "art_simclr", "ckpt_path": str(ckpt)})
    assert isinstance(extractor, ArtSimCLRFeatures) and extractor.num_classes == 0
    out = extractor(torch.randint(0, 256, (5, 3, 48, 40), dtype=torch.uint8))
    assert set(out) == {"features"} and out["features"].shape == (5, 16)
    assert extractor.weights_sha256 and extractor.name == "art_simclr"
    GenerativeMetrics(extractor, ["fid", "kid", "precision", "recall"])  # fine without logits
    with pytest.raises(ValueError, match=r"is needs class logits.*art_simclr"):
        GenerativeMetrics(extractor, ["fid", "is"])
