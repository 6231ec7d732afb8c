"""The art-domain feature extractor: the real ``experiment=art_classifier`` config trained for a few steps on the art
folder, the extractor built from its stable checkpoint, its preprocessing, and an evaluation in the protocol."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.transforms import v2

from atelier.metrics.art_features import ArtClassifierFeatures
from atelier.metrics.evaluator import Evaluator
from atelier.metrics.suite import build_extractor
from atelier.models.classifier import ClassifierNet, MNISTClassifier, augment_batch
from atelier.tasks import train
from tests.conftest import DATA_DIR, compose_cfg

ART = DATA_DIR / "art"
TINY = ["experiment=art_classifier", "logger=csv", "print_config=false", "data.num_workers=0", "data.batch_size=8",
        "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
        "model.net.width=4", "model.net.feature_dim=16", "~callbacks.rich_progress_bar", "~callbacks.model_summary"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, art_available: Path) -> tuple[Path, Path]:
    """``(log_dir, stable checkpoint)`` of a 3-step run of the real art classifier experiment."""
    log_dir = tmp_path_factory.mktemp("art_logs")
    cfg = compose_cfg("train", [*TINY, f"paths.log_dir={log_dir}"], log_dir / "run")
    metrics = train.run(cfg)
    assert metrics["global_step"] == 3 and 0.0 <= metrics["val/acc"] <= 1.0
    ckpt = log_dir / "art_classifier" / "classifier.ckpt"
    assert ckpt.is_file()
    return log_dir, ckpt


def test_experiment_config(tmp_path: Path) -> None:
    cfg = compose_cfg("train", ["experiment=art_classifier"], tmp_path)
    assert cfg.model._target_ == "atelier.models.classifier.MNISTClassifier"
    assert cfg.model.net.channels == 3 and cfg.model.net.num_classes == 3 and cfg.model.net.image_size == 64
    assert cfg.data._target_.endswith("ArtFolderDataModule") and cfg.callbacks.sample_grid is None
    assert cfg.callbacks.stable_checkpoint.dirpath.endswith("/art_classifier")
    assert cfg.callbacks.stable_checkpoint.monitor == "val/acc"
    OmegaConf.to_container(cfg, resolve=True)


def test_trained_extractor_gives_features_from_the_stable_checkpoint(trained: tuple[Path, Path],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    log_dir, ckpt = trained
    monkeypatch.delenv("ATELIER_ART_CLASSIFIER", raising=False)
    cfg = compose_cfg("evaluate", ["ckpt_path=x.ckpt", "feature_extractor=art_classifier",
                                   f"paths.log_dir={log_dir}"], log_dir / "eval")
    options = OmegaConf.to_container(cfg.feature_extractor, resolve=True)
    assert options == {"name": "art_classifier", "ckpt_path": None, "antialias": True}  # None: the pinned weights
    extractor = build_extractor({**options, "ckpt_path": str(ckpt)})  # the one this run trained
    assert isinstance(extractor, ArtClassifierFeatures)
    assert extractor.num_features == 16 and extractor.num_classes == 3 and extractor.input_size == 64
    assert extractor.weights == str(ckpt) and len(extractor.weights_sha256) == 16
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    out = extractor(images)
    assert out["features"].shape == (5, 16) and out["logits"].shape == (5, 3)
    assert out["features"].dtype == torch.float32 and bool((out["features"] >= 0).all())
    assert torch.equal(extractor(images)["features"], out["features"])  # eval mode: deterministic


def test_evaluation_in_the_protocol_with_cache(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from atelier.data.art_folder import ArtFolderDataModule

    _, ckpt = trained
    datamodule = ArtFolderDataModule(str(ART), image_size=64, batch_size=16, check_images=False, hflip=False)
    datamodule.setup("fit")
    real = torch.stack([datamodule.train_set[i][0] for i in range(40)])

    class Real(torch.nn.Module):
        """Returns the reference images themselves, in order."""

        drawn = 0

        def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
            self.drawn += n
            return real[self.drawn - n:self.drawn]

    metrics = ["fid", "kid", "precision", "recall"]
    evaluator = Evaluator({"name": "art_classifier", "ckpt_path": str(ckpt)}, datamodule, metrics, 40,
                          reference_size=40, cache_dir=tmp_path, batch_size=20)
    result = evaluator.evaluate(Real())
    m, p = result["metrics"], result["protocol"]
    assert m["fid"] == pytest.approx(0.0, abs=1e-2) and m["precision"] == 1.0 and m["recall"] == 1.0
    assert sum(m["class_histogram"]) == 40 and len(m["class_histogram"]) == 3
    assert p["extractor"] == "art_classifier" and p["weights_sha256"] == evaluator.extractor.weights_sha256
    assert p["reference_split"] == "train" and p["dataset"]["name"] == "ArtFolderDataModule"
    assert p["channels"] == "RGB, grey repeated to 3" and p["antialias"] is True
    assert p["prc_k"] == 3 and p["prc_num_real"] == 40
    files = list(tmp_path.glob("ArtFolderDataModule_train-40_art_classifier_*.pt"))
    assert len(files) == 1 and files[0].stem.endswith(evaluator.protocol().reference_key())
    again = Evaluator({"name": "art_classifier", "ckpt_path": str(ckpt)}, datamodule, metrics, 40,
                      reference_size=40, cache_dir=tmp_path, batch_size=20).evaluate(Real())
    assert again["reference_cache_hit"] is True and again["metrics"]["fid"] == pytest.approx(m["fid"], abs=1e-9)


def test_samples_resized_to_the_reference_resolution(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """``sample_image_size``: 64 px samples scored against a 32 px reference at 32 px, as a 32 px model would be."""
    from atelier.data.art_folder import ArtFolderDataModule

    _, ckpt = trained
    kwargs = {"batch_size": 16, "check_images": False, "hflip": False}
    big = ArtFolderDataModule(str(ART), image_size=64, **kwargs)
    big.setup("fit")
    real_64 = torch.stack([big.train_set[i][0] for i in range(40)])
    reference_32 = ArtFolderDataModule(str(ART), image_size=32, **kwargs)

    class Real64(torch.nn.Module):
        drawn = 0

        def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
            self.drawn += n
            return real_64[self.drawn - n:self.drawn]

    def score(size: int | None) -> dict:
        evaluator = Evaluator({"name": "art_classifier", "ckpt_path": str(ckpt)}, reference_32, ["fid"], 40,
                              reference_size=40, cache_dir=tmp_path, batch_size=20, sample_image_size=size)
        return evaluator.evaluate(Real64())

    resized, as_drawn = score(32), score(None)
    assert resized["protocol"]["sample_image_size"] == 32 and as_drawn["protocol"]["sample_image_size"] is None
    # the same paintings: at 32 px they match the 32 px reference far better than their 64 px detail does
    assert resized["metrics"]["fid"] < 0.5 * as_drawn["metrics"]["fid"]
    assert as_drawn["metrics"]["fid"] > 0
    with pytest.raises(ValueError, match="sample_image_size=0"):
        Evaluator({"name": "art_classifier", "ckpt_path": str(ckpt)}, reference_32, ["fid"], 40,
                  reference_size=40, sample_image_size=0)


def test_preprocessing_channels_crop_and_resize() -> None:
    torch.manual_seed(0)
    net = ClassifierNet(image_size=64, channels=3, num_classes=3, width=4, feature_dim=8)
    extractor = ArtClassifierFeatures(net=net)
    grey = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    assert torch.equal(extractor.preprocess(grey), extractor.preprocess(grey.expand(-1, 3, -1, -1)))
    wide = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    assert torch.equal(extractor.preprocess(wide), extractor.preprocess(wide[..., 16:80].contiguous()))
    big = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    assert extractor.preprocess(big).shape == (2, 3, 64, 64)
    aliased = ArtClassifierFeatures(net=net, antialias=False).preprocess(big)
    assert not torch.allclose(aliased, extractor.preprocess(big))  # antialias reaches the resize
    with pytest.raises(TypeError, match="uint8"):
        extractor(big.float())
    with pytest.raises(FileNotFoundError, match=r"experiment=art_classifier.*pin_feature_weights"):
        build_extractor({"name": "art_classifier", "ckpt_path": "/nonexistent/classifier.ckpt"})


def test_augmentation_per_image_in_training_step_only() -> None:
    torch.manual_seed(0)
    transform = v2.Compose([v2.RandomResizedCrop(32, scale=(0.35, 1.0), antialias=True),
                            v2.ColorJitter(0.4, 0.4, 0.4, 0.05)])
    x = torch.rand(1, 3, 32, 32).mul(2).sub(1).expand(6, -1, -1, -1).contiguous()  # one image six times
    out = augment_batch(x, transform)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert len({tuple(o.flatten()[:50].tolist()) for o in out}) == 6  # each copy got its own draw

    seen: list[torch.Tensor] = []

    class Recording(ClassifierNet):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            seen.append(images.clone())
            return super().forward(images)

    net = Recording(image_size=32, channels=3, num_classes=3, width=4, feature_dim=8)
    module = MNISTClassifier(net, optimizer=lambda params: torch.optim.SGD(params, lr=0.1), augment=transform)
    module.log = lambda *args, **kwargs: None  # no trainer attached
    batch = (x, torch.zeros(6, dtype=torch.long))
    module.training_step(batch, 0)
    module.validation_step(batch, 0)
    assert not torch.equal(seen[0], x) and torch.equal(seen[1], x)
