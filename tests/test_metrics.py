"""Evaluation metrics: quantisation, FID/KID/IS through torchmetrics, the reference cache, the protocol record,
the feature extractors (MNIST classifier trained here on real MNIST; Inception with random weights)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.datasets import MNIST

from atelier.metrics.cache import ReferenceCache, ReferenceStats
from atelier.metrics.evaluator import Evaluator
from atelier.metrics.inception import WEIGHTS_FILE, InceptionFeatures
from atelier.metrics.mnist_features import MNISTClassifierFeatures
from atelier.metrics.protocol import to_uint8
from atelier.metrics.suite import GenerativeMetrics, build_extractor, check_metrics, class_statistics
from atelier.models.classifier import ClassifierNet
from tests.conftest import DATA_DIR

# small sample counts are on purpose here (fast); the evaluator warns about them
pytestmark = pytest.mark.filterwarnings("ignore:num_samples=.*feature dimension:UserWarning")


@pytest.fixture(scope="module")
def mnist(mnist_available: Path) -> dict[str, torch.Tensor]:
    """Real MNIST as uint8 ``(N, 1, 28, 28)`` images and int64 labels."""
    train, test = MNIST(str(DATA_DIR), train=True), MNIST(str(DATA_DIR), train=False)
    return {"train_x": train.data[:, None], "train_y": train.targets,
            "test_x": test.data[:, None], "test_y": test.targets}


@pytest.fixture(scope="module")
def classifier(mnist: dict[str, torch.Tensor]) -> MNISTClassifierFeatures:
    """A 28-px ClassifierNet trained for 120 steps on real MNIST (a few seconds), as a feature extractor."""
    torch.manual_seed(0)
    net = ClassifierNet(image_size=28, width=8, feature_dim=64)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x_all, y_all = mnist["train_x"], mnist["train_y"]
    for _ in range(120):
        idx = torch.randint(0, len(x_all), (64,))
        loss = F.cross_entropy(net(x_all[idx].float() / 127.5 - 1), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return MNISTClassifierFeatures(net=net)


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    """Inception-v3 with random weights; tests shrink its input size to 75 px (the smallest it takes) for speed."""
    torch.manual_seed(0)
    return InceptionFeatures(random_weights=True, antialias=False)


class FakeData:
    """The parts of a datamodule the evaluator uses: ``test_set`` of ``(image in [-1, 1], label)`` and hparams."""

    def __init__(self, images_uint8: torch.Tensor, image_size: int = 28) -> None:
        images = images_uint8.float() / 127.5 - 1
        self.train_set = self.test_set = TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
        self.val_set = None
        self.hparams = {"image_size": image_size, "channels": 1, "batch_size": 8}

    def setup(self, stage: str | None = None) -> None:
        pass


class FixedModel(nn.Module):
    """A 'generative model' whose ``sample`` returns given images in [-1, 1], in order."""

    def __init__(self, images_uint8: torch.Tensor) -> None:
        super().__init__()
        self.images = images_uint8.float() / 127.5 - 1
        self.drawn = 0

    def sample(self, n: int, generator: torch.Generator | None = None, batch_size: int = 256) -> torch.Tensor:
        out = self.images[self.drawn:self.drawn + n]
        self.drawn += n
        return out


class Counting(nn.Module):
    """Wraps an extractor and counts the images it sees; ``weights_sha256`` can be changed to mimic new weights."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        for key in ("name", "num_features", "num_classes", "input_size", "feature_layer", "channels", "resize",
                    "antialias", "weights", "weights_sha256"):
            setattr(self, key, getattr(inner, key))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += images.shape[0]
        return self.inner(images)


def test_to_uint8_round_trips_mnist_pixels_and_clamps() -> None:
    k = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    as_mnist = (k.float() / 255 - 0.5) / 0.5  # what ToTensor + Normalize(0.5, 0.5) gives
    assert torch.equal(to_uint8(as_mnist), k)
    out = to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 1, 5))
    assert out.flatten().tolist() == [0, 0, 128, 255, 255]


def test_classifier_learned_mnist(classifier: MNISTClassifierFeatures, mnist: dict[str, torch.Tensor]) -> None:
    logits = classifier(mnist["test_x"][:1000])["logits"]
    accuracy = (logits.argmax(1) == mnist["test_y"][:1000]).float().mean().item()
    assert accuracy > 0.85


def test_fid_of_a_set_against_itself_is_zero(classifier: MNISTClassifierFeatures,
                                             mnist: dict[str, torch.Tensor]) -> None:
    images = mnist["test_x"][:600]
    metrics = GenerativeMetrics(classifier, ["fid"])
    metrics.set_reference(ReferenceStats.from_features(classifier(images)["features"], {}))
    for chunk in images.split(200):
        metrics.update(chunk)
    assert abs(metrics.compute()["fid"]) < 1e-6


def test_fid_separates_mnist_from_noise(classifier: MNISTClassifierFeatures,
                                        mnist: dict[str, torch.Tensor]) -> None:
    reference = ReferenceStats.from_features(classifier(mnist["train_x"][:2000])["features"], {})
    torch.manual_seed(1)
    sets = {"test": mnist["test_x"][:1000], "noise": torch.randint(0, 256, (1000, 1, 28, 28), dtype=torch.uint8),
            "ones": mnist["test_x"][:2000][mnist["test_y"][:2000] == 1][:200]}
    fid, kid = {}, {}
    for name, images in sets.items():
        metrics = GenerativeMetrics(classifier, ["fid", "kid"], kid_subsets=20)
        metrics.set_reference(reference)
        metrics.update(images)
        values = metrics.compute()
        fid[name], kid[name] = values["fid"], values["kid"]
        if name == "ones":
            assert values["class_coverage"] == 0.1  # one class of ten
    assert fid["test"] < 0.05 * fid["noise"], fid
    assert fid["test"] < 0.2 * fid["ones"], fid  # mode collapse onto one digit is far from MNIST
    assert abs(kid["test"]) < 0.05 * kid["noise"], kid


def test_fid_matches_torchmetrics_real_update(classifier: MNISTClassifierFeatures,
                                              mnist: dict[str, torch.Tensor]) -> None:
    """Cached reference statistics give the same FID as torchmetrics fed with the real images themselves."""
    from torchmetrics.image import FrechetInceptionDistance

    from atelier.metrics.suite import FeatureHead, SharedExtractor

    real, fake = mnist["train_x"][:500], mnist["test_x"][:300]
    plain = FrechetInceptionDistance(feature=FeatureHead(SharedExtractor(classifier), "features", 64))
    plain.update(real, real=True)
    plain.update(fake, real=False)
    ours = GenerativeMetrics(classifier, ["fid"])
    ours.set_reference(ReferenceStats.from_features(classifier(real)["features"], {}))
    ours.update(fake)
    assert ours.compute()["fid"] == pytest.approx(float(plain.compute()), rel=1e-6)


def test_kid_subset_size_adapts_or_errors(classifier: MNISTClassifierFeatures,
                                          mnist: dict[str, torch.Tensor]) -> None:
    reference = ReferenceStats.from_features(classifier(mnist["train_x"][:100])["features"], {})
    adaptive = GenerativeMetrics(classifier, ["kid"], kid_subsets=5, kid_subset_size=None)
    adaptive.set_reference(reference)
    adaptive.update(mnist["test_x"][:40])
    values = adaptive.compute()
    assert values["kid_subset_size"] == 40 and math.isfinite(values["kid"])
    fixed = GenerativeMetrics(classifier, ["kid"], kid_subsets=5, kid_subset_size=50)
    fixed.set_reference(reference)
    fixed.update(mnist["test_x"][:40])
    with pytest.raises(ValueError, match=r"kid_subset_size=50 is larger than the 40 generated"):
        fixed.compute()


def test_one_extractor_pass_per_batch_for_all_metrics(classifier: MNISTClassifierFeatures,
                                                      mnist: dict[str, torch.Tensor]) -> None:
    counting = Counting(classifier)
    metrics = GenerativeMetrics(counting, ["fid", "kid", "is"], kid_subsets=2, is_splits=2)
    metrics.set_reference(ReferenceStats.from_features(classifier(mnist["train_x"][:50])["features"], {}))
    metrics.update(mnist["test_x"][:30])
    assert counting.calls == 30
    values = metrics.compute()
    assert 1.0 <= values["is"] <= 10.0
    assert sum(values["class_histogram"]) == 30


def test_conditional_accuracy_counts_the_requested_class(classifier: MNISTClassifierFeatures,
                                                          mnist: dict[str, torch.Tensor]) -> None:
    images, labels = mnist["test_x"][:400], mnist["test_y"][:400]
    right = GenerativeMetrics(classifier, ["fid"])
    right.set_reference(ReferenceStats.from_features(classifier(mnist["train_x"][:500])["features"], {}))
    for x, y in zip(images.split(150), labels.split(150), strict=True):
        right.update(x, labels=y)
    accuracy = right.compute()["cond_accuracy"]
    assert accuracy > 0.85  # the classifier's own accuracy on real digits
    right.reset()
    right.update(images, labels=(labels + 1) % 10)  # asked for the wrong class
    assert right.compute()["cond_accuracy"] < 0.1
    right.reset()
    right.update(images)  # no labels: no conditional accuracy
    assert "cond_accuracy" not in right.compute()


def test_class_statistics_by_hand() -> None:
    stats = class_statistics(torch.tensor([5, 5, 0, 0]))
    assert stats["class_coverage"] == 0.5
    assert stats["class_entropy"] == pytest.approx(math.log(2) / math.log(4))
    assert class_statistics(torch.tensor([3, 3, 3]))["class_entropy"] == pytest.approx(1.0)


def test_reference_cache_hit_and_invalidation(tmp_path: Path, classifier: MNISTClassifierFeatures,
                                              mnist: dict[str, torch.Tensor]) -> None:
    data = FakeData(mnist["test_x"][:120])
    counting = Counting(classifier)

    def evaluator(**kw: Any) -> Evaluator:
        options = {"reference_size": 100, "cache_dir": tmp_path, "batch_size": 50, "num_samples": 20,
                   "metrics": ["fid"], **kw}
        return Evaluator(counting, data, **options)

    first = evaluator()
    stats = first.reference()
    assert first.cache_hit is False and counting.calls == 100
    assert len(list(tmp_path.glob("*.pt"))) == 1
    second = evaluator()
    cached = second.reference()
    assert second.cache_hit is True and counting.calls == 100  # nothing recomputed
    assert torch.equal(cached.features, stats.features) and torch.allclose(cached.cov, stats.cov)
    evaluator(num_samples=30).reference()  # the generated-side settings do not touch the reference key
    assert counting.calls == 100

    for change in ({"reference_size": 90}, {"antialias": True}, {"weights_sha256": "0123"}, {"image_size": 32}):
        calls = counting.calls
        if "antialias" in change or "weights_sha256" in change:
            setattr(counting, *next(iter(change.items())))
            ev = evaluator()
        elif "image_size" in change:
            data.hparams["image_size"] = 32
            ev = evaluator()
        else:
            ev = evaluator(**change)
        ev.reference()
        assert ev.cache_hit is False and counting.calls > calls, change


def test_cache_file_with_other_fields_is_recomputed(tmp_path: Path, classifier: MNISTClassifierFeatures,
                                                    mnist: dict[str, torch.Tensor]) -> None:
    data = FakeData(mnist["test_x"][:40])
    ev = Evaluator(classifier, data, ["fid"], num_samples=10, reference_size=40, cache_dir=tmp_path)
    ev.reference()
    path = ReferenceCache(tmp_path).path(ev.protocol())
    payload = torch.load(path, weights_only=True)
    payload["fields"]["reference_size"] = 7
    torch.save(payload, path)
    again = Evaluator(classifier, data, ["fid"], num_samples=10, reference_size=40, cache_dir=tmp_path)
    again.reference()
    assert again.cache_hit is False


def test_protocol_record(tmp_path: Path, classifier: MNISTClassifierFeatures,
                         mnist: dict[str, torch.Tensor]) -> None:
    data = FakeData(mnist["test_x"][:200])
    ev = Evaluator(classifier, data, ["fid", "kid", "is"], num_samples=60, reference_size=200, batch_size=25,
                   is_splits=3, kid_subsets=4, cache_dir=tmp_path)
    result = ev.evaluate(FixedModel(mnist["train_x"][:60]))
    p = result["protocol"]
    assert p["extractor"] == "mnist_classifier" and p["num_features"] == 64 and p["dtype"] == "float64"
    assert p["antialias"] is False and "uint8" in p["quantisation"]
    assert p["num_samples"] == 60 and p["reference_split"] == "test" and p["reference_size"] == 200
    assert p["kid_subset_size"] == 60 == result["metrics"]["kid_subset_size"]
    assert p["dataset"]["name"] == "FakeData" and p["dataset"]["image_size"] == 28
    assert result["metrics"]["fid"] > 0 and sum(result["metrics"]["class_histogram"]) == 60
    assert result["timing"]["feature_images_per_sec"] > 0


def test_bad_values_name_the_key(classifier: MNISTClassifierFeatures, mnist: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match=r"feature_extractor='vgg' is not allowed; choose one of"):
        build_extractor({"name": "vgg"})
    with pytest.raises(ValueError, match=r"metrics=\['fid', 'lpips'\] is not allowed"):
        check_metrics(["fid", "lpips"])
    data = FakeData(mnist["test_x"][:20])
    with pytest.raises(ValueError, match=r"reference_split='val' is not allowed .* choose one of \['train', 'test'\]"):
        Evaluator(classifier, data, ["fid"], num_samples=10, reference_split="val")
    with pytest.raises(ValueError, match=r"reference_size=50 is not allowed"):
        Evaluator(classifier, data, ["fid"], num_samples=10, reference_size=50)
    with pytest.raises(FileNotFoundError, match=r"experiment=mnist_classifier"):
        build_extractor({"name": "mnist_classifier", "ckpt_path": "/nonexistent/classifier.ckpt"})


def test_the_digit_classifier_refuses_rgb_data(classifier: MNISTClassifierFeatures,
                                              mnist: dict[str, torch.Tensor]) -> None:
    grey = FakeData(mnist["test_x"][:20])
    rgb = FakeData(mnist["test_x"][:20].repeat(1, 3, 1, 1))  # RGB images, e.g. paintings
    # the digit classifier scores grey images; on RGB ones it names the extractors that fit
    assert Evaluator(classifier, grey, ["fid"], num_samples=10).extractor is classifier
    with pytest.raises(ValueError, match=r"feature_extractor=mnist_classifier was trained on 1-channel images and "
                                         r"cannot score FakeData \(3-channel images\): choose "
                                         r"feature_extractor=art_classifier"):
        Evaluator(classifier, rgb, ["fid"], num_samples=10)


def test_mnist_extractor_pads_28_and_resizes_with_the_protocol_antialias(
        classifier: MNISTClassifierFeatures, monkeypatch: pytest.MonkeyPatch) -> None:
    net32 = ClassifierNet(image_size=32, width=4, feature_dim=8).eval()
    calls: list[bool] = []
    original = F.interpolate

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(kwargs.get("antialias"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    for antialias in (False, True):
        extractor = build_extractor({"name": "mnist_classifier", "net": net32, "antialias": antialias})
        x28 = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
        assert extractor.preprocess(x28).shape == (2, 1, 32, 32) and calls == []  # padded, not resized
        assert extractor.preprocess(x28)[..., :2, :].eq(-1).all()
        out = extractor(torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8))
        assert out["features"].shape == (2, 8) and out["logits"].shape == (2, 10)
        assert calls == [antialias]
        calls.clear()


@pytest.mark.parametrize("antialias", [False, True])
def test_antialias_reaches_the_inception_resize(inception: InceptionFeatures, antialias: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import torchmetrics.image.fid as tm_fid

    tf1_calls, torch_calls = [], []
    tf1, interpolate = tm_fid.interpolate_bilinear_2d_like_tensorflow1x, F.interpolate
    monkeypatch.setattr(tm_fid, "interpolate_bilinear_2d_like_tensorflow1x",
                        lambda *a, **k: tf1_calls.append(k) or tf1(*a, **k))
    monkeypatch.setattr(torch.nn.functional, "interpolate",
                        lambda *a, **k: torch_calls.append(k.get("antialias")) or interpolate(*a, **k))
    extractor = build_extractor({"name": "inception", "random_weights": True, "antialias": antialias}) \
        if antialias else inception
    assert extractor.net.use_antialias is antialias
    extractor.net.INPUT_IMAGE_SIZE = 75
    extractor(torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8))
    assert (len(tf1_calls), torch_calls.count(True)) == ((0, 1) if antialias else (1, 0))


def test_inception_path_with_random_weights(inception: InceptionFeatures) -> None:
    inception.net.INPUT_IMAGE_SIZE = 75
    torch.manual_seed(0)
    real = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    counting = Counting(inception)
    out = inception(real)
    assert out["features"].shape == (3, 2048) and out["logits"].shape == (3, 1008)
    metrics = GenerativeMetrics(counting, ["fid", "kid", "is"], kid_subsets=2, is_splits=3)
    assert metrics.num_classes == 0  # no class histogram over ImageNet classes
    metrics.set_reference(ReferenceStats.from_features(out["features"], {}))
    metrics.update(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8).float() / 127.5 - 1)
    values = metrics.compute()
    assert counting.calls == 3 and all(math.isfinite(values[k]) for k in ("fid", "kid", "is"))
    assert inception.weights_sha256 is None and inception.name == "inception"


def test_missing_inception_weights_error_names_file_and_folder(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "somewhere" / WEIGHTS_FILE
    with pytest.raises(FileNotFoundError, match=rf"{WEIGHTS_FILE} not found in {tmp_path / 'somewhere'}"):
        InceptionFeatures(weights_path=missing)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as err:
        InceptionFeatures(download=False)
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in str(err.value) and WEIGHTS_FILE in str(err.value)
    assert "feature_extractor.weights_path" in str(err.value)
