"""The pinned evaluation yardsticks: the packaged classifier weights are what the default configs read, they are
trained classifiers (they recognise real digits and paintings), and pinning a checkpoint keeps its features."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from atelier.metrics.pinned import PINNED, classifier_ckpt, pinned_path
from atelier.metrics.protocol import file_digest
from atelier.metrics.suite import build_extractor
from atelier.tasks import train
from scripts.pin_feature_weights import pin
from tests.conftest import DATA_DIR, compose_cfg


@pytest.mark.parametrize("name", sorted(PINNED))
def test_default_config_reads_the_packaged_weights(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    monkeypatch.delenv("ATELIER_MNIST_CLASSIFIER", raising=False)
    monkeypatch.delenv("ATELIER_ART_CLASSIFIER", raising=False)
    monkeypatch.delenv("ATELIER_ART_SIMCLR", raising=False)
    cfg = compose_cfg("evaluate", ["ckpt_path=x.ckpt", f"feature_extractor={name}"], tmp_path)
    options = OmegaConf.to_container(cfg.feature_extractor, resolve=True)
    assert options["ckpt_path"] is None
    path = pinned_path(name)
    assert path.is_file() and path.parent.name == "weights" and classifier_ckpt(None, name) == path
    extractor = build_extractor(options)
    assert extractor.weights == str(path) and extractor.weights_sha256 == file_digest(path)
    monkeypatch.setenv(f"ATELIER_{name.upper()}", "/elsewhere/classifier.ckpt")  # the variable still wins
    cfg = compose_cfg("evaluate", ["ckpt_path=x.ckpt", f"feature_extractor={name}"], tmp_path)
    assert cfg.feature_extractor.ckpt_path == "/elsewhere/classifier.ckpt"
    with pytest.raises(ValueError, match="pinned"):
        pinned_path("inception")


def test_pinned_mnist_classifier_recognises_real_digits(mnist_available: Path) -> None:
    from atelier.data.mnist import MNISTDataModule

    dm = MNISTDataModule(str(mnist_available), image_size=28, download=False, val_size=1000)
    dm.setup("test")
    images = torch.stack([dm.test_set[i][0] for i in range(500)])
    labels = torch.tensor([dm.test_set[i][1] for i in range(500)])
    extractor = build_extractor({"name": "mnist_classifier", "ckpt_path": None})
    out = extractor(((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    assert out["features"].shape == (500, extractor.num_features)
    accuracy = (out["logits"].argmax(1) == labels).float().mean().item()
    assert accuracy > 0.97, accuracy  # a trained classifier (val/acc 0.991 when pinned), not random weights


def held_out_paintings() -> tuple[torch.Tensor, torch.Tensor]:
    """300 paintings of the art experiments' validation split (val_fraction 0.15, seed 0: neither the art classifier
    nor the SimCLR network trained on them) as uint8 ``(300, 3, 64, 64)``, and their artist labels ``(300,)``."""
    from atelier.data.art_folder import ArtFolderDataModule

    root = DATA_DIR / "art"
    if not any(root.glob("*/*.jpg")):
        pytest.fail(f"the art folder is needed in {root}: set ATELIER_DATA_DIR to ../shared/data")
    dm = ArtFolderDataModule(str(root), image_size=64, batch_size=50, num_workers=0, val_fraction=0.15,
                             check_images=False)
    dm.setup("fit")
    batches = list(itertools.islice(dm.val_dataloader(), 6))
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert len(labels) == 300
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), labels


def test_pinned_art_classifier_recognises_the_artists() -> None:
    images, labels = held_out_paintings()
    out = build_extractor({"name": "art_classifier", "ckpt_path": None})(images)
    accuracy = (out["logits"].argmax(1) == labels).float().mean().item()
    majority = labels.bincount().max().item() / len(labels)
    assert accuracy > majority + 0.1, (accuracy, majority)  # val/acc 0.663 when pinned


def test_pinned_art_simclr_features_carry_the_artists_without_having_seen_them() -> None:
    from atelier.models.simclr import leave_one_out_knn_accuracy

    images, labels = held_out_paintings()
    extractor = build_extractor({"name": "art_simclr", "ckpt_path": None})
    out = extractor(images)
    assert set(out) == {"features"} and out["features"].shape == (300, extractor.num_features)
    accuracy = leave_one_out_knn_accuracy(out["features"], labels, k=5)
    majority = labels.bincount().max().item() / len(labels)
    # trained without labels; val/knn_acc 0.61 on the whole held-out split when pinned
    assert accuracy > majority + 0.1, (accuracy, majority)


def test_pinning_keeps_the_features_and_drops_the_training_state(tmp_path: Path, mnist_available: Path) -> None:
    out = tmp_path / "run"
    cfg = compose_cfg("train", ["model=classifier", "data=mnist", "logger=csv", "print_config=false",
                                "data.num_workers=0", "data.batch_size=16", "data.val_size=64",
                                "trainer.max_steps=2", "trainer.limit_val_batches=1", "model.net.width=4",
                                "model.net.feature_dim=16", "model.test_on_train_end=false",
                                "~callbacks.rich_progress_bar", "~callbacks.model_summary"], out)
    train.run(cfg)
    source = out / "checkpoints" / "last.ckpt"
    pinned = pin(source, "mnist_classifier", val_acc=0.5, out=tmp_path / "pinned.ckpt")
    stored = torch.load(pinned, weights_only=True)
    assert "optimizer_states" not in stored and "loops" not in stored and stored["val_acc"] == 0.5
    assert stored["source_sha256"] == file_digest(source) and pinned.stat().st_size < source.stat().st_size
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    a = build_extractor({"name": "mnist_classifier", "ckpt_path": str(source)})(images)
    b = build_extractor({"name": "mnist_classifier", "ckpt_path": str(pinned)})(images)
    assert torch.equal(a["features"], b["features"]) and torch.equal(a["logits"], b["logits"])
    with pytest.raises(ValueError, match="pinned extractors"):
        pin(source, "inception")
