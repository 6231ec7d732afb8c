"""Improved precision and recall (Kynkäänniemi et al. 2019) on synthetic features: against a brute-force reference,
on identical, mode-collapsed and off-manifold generators, and through the evaluator (protocol record, cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from atelier.metrics.evaluator import Evaluator
from atelier.metrics.precision_recall import PrecisionRecall, precision_recall
from atelier.metrics.suite import DEFAULT_METRICS, GenerativeMetrics, check_metrics

pytestmark = pytest.mark.filterwarnings("ignore:num_samples=.*feature dimension:UserWarning")


def brute_force(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    """Eq. 1-2 of the paper written out: all pairwise distances in float64, radii = k-th neighbour (self excluded)."""
    real, fake = real.double(), fake.double()

    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1).sqrt()

    radius_real = dist(real, real).sort(dim=1).values[:, k]  # column 0 is the point itself
    radius_fake = dist(fake, fake).sort(dim=1).values[:, k]
    inside_real = (dist(fake, real) <= radius_real[None, :]).any(dim=1)
    inside_fake = (dist(real, fake) <= radius_fake[None, :]).any(dim=1)
    return inside_real.sum().item() / len(fake), inside_fake.sum().item() / len(real)


def manifold(n: int, generator: torch.Generator, dim: int = 4, ambient: int = 32) -> torch.Tensor:
    """``(n, ambient)`` float64 points of a standard normal on a fixed random ``dim``-d linear subspace."""
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) @ basis(ambient)[:, :dim].T


def basis(ambient: int = 32) -> torch.Tensor:
    """A fixed random orthonormal basis ``(ambient, ambient)``."""
    g = torch.Generator().manual_seed(1234)
    return torch.linalg.qr(torch.randn(ambient, ambient, generator=g, dtype=torch.float64))[0]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_brute_force_exactly(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    real = torch.randn(150, 6, generator=g)
    fake = torch.randn(110, 6, generator=g) * 1.3 + 0.4
    expected = brute_force(real, fake, k)
    assert precision_recall(real, fake, k) == expected
    # memory bound: one row per distance block gives the same numbers
    assert precision_recall(real, fake, k, max_block_elements=1) == expected
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0


def test_identical_distributions_give_high_precision_and_recall() -> None:
    g = torch.Generator().manual_seed(0)
    precision, recall = precision_recall(manifold(2000, g), manifold(2000, g), k=3)
    assert precision > 0.9 and recall > 0.9
    assert abs(precision - recall) < 0.05


def test_a_set_against_itself_is_one() -> None:
    features = manifold(300, torch.Generator().manual_seed(1))
    assert precision_recall(features, features.clone(), k=3) == (1.0, 1.0)


def test_mode_collapse_keeps_precision_and_loses_recall() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=g, dtype=torch.float64) * 10
    real = centres[torch.arange(2000) % 10] + manifold(2000, g)  # 10 equal clusters
    collapsed = centres[0] + manifold(2000, g)                   # every sample near cluster 0
    precision, recall = precision_recall(real, collapsed, k=3)
    assert precision > 0.9
    assert abs(recall - 0.1) < 0.02


def test_samples_off_the_manifold_lose_precision() -> None:
    g = torch.Generator().manual_seed(0)
    real, fake = manifold(2000, g), manifold(2000, g)
    # displaced off the 4-d manifold (what blur does to features): the real points stay covered
    off = torch.randn(2000, 28, generator=g, dtype=torch.float64) @ basis()[:, 4:].T * 0.5
    precision, recall = precision_recall(real, fake + off, k=3)
    assert precision < 0.1 and recall > 0.9
    # shifted as a whole: neither covers the other
    precision, recall = precision_recall(real, fake + 3.0, k=3)
    assert precision < 0.05 and recall < 0.05


def test_bad_inputs_raise() -> None:
    a, b = torch.randn(10, 4), torch.randn(12, 4)
    with pytest.raises(ValueError, match="prc_k=10"):
        precision_recall(a, b, k=10)
    with pytest.raises(ValueError, match="prc_k=0"):
        precision_recall(a, b, k=0)
    with pytest.raises(ValueError, match="different dimensions"):
        precision_recall(a, torch.randn(12, 5))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        precision_recall(a[0], b)
    with pytest.raises(ValueError, match="non-finite"):
        precision_recall(a, torch.full((12, 4), float("nan")))
    with pytest.raises(ValueError, match="prc_k=0"):
        PrecisionRecall(nn.Identity(), k=0)


class PooledPixels(nn.Module):
    """A stand-in extractor: 4×4 average-pooled pixels of uint8 images as 16-d features (no classes)."""

    name = "pooled_pixels"
    num_features = 16
    num_classes = 0
    input_size = 16
    feature_layer = "avgpool 4x4 (16)"
    channels = "grey"
    resize = "none"
    antialias = False
    weights = "none"
    weights_sha256 = None

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += images.shape[0]
        x = F.adaptive_avg_pool2d(images.float().div(127.5).sub(1), 4).flatten(1)
        return {"features": x, "logits": torch.zeros(len(x), 1)}


class FakeData:
    """``train_set`` / ``test_set`` of ``(image in [-1, 1], label)`` and hparams, as the evaluator needs."""

    def __init__(self, images: torch.Tensor) -> None:
        self.train_set = self.test_set = TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
        self.val_set = None
        self.hparams = {"image_size": images.shape[-1], "channels": 1}

    def setup(self, stage: str | None = None) -> None:
        pass


class FixedModel(nn.Module):
    """``sample`` returns the given images in order."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images, self.drawn = images, 0

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        out = self.images[self.drawn:self.drawn + n]
        self.drawn += n
        return out


def blobs(n: int, seed: int) -> torch.Tensor:
    """``(n, 1, 16, 16)`` smooth random images in ``[-1, 1]`` (upsampled 4×4 noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1
    return F.interpolate(low, size=16, mode="nearest")


def test_metric_names_and_defaults() -> None:
    assert check_metrics(["FID", "precision", "recall"]) == ["fid", "precision", "recall"]
    assert tuple(DEFAULT_METRICS) == ("fid", "kid", "is")
    with pytest.raises(ValueError, match="precision"):
        check_metrics(["prc"])


def test_evaluator_records_k_and_counts_and_uses_the_cache(tmp_path: Path) -> None:
    reference = blobs(300, 0)
    extractor = PooledPixels()
    kwargs = {"reference_size": 300, "cache_dir": tmp_path, "batch_size": 64}
    evaluator = Evaluator(extractor, FakeData(reference), ["fid", "kid", "precision", "recall"], 200, **kwargs)
    same = evaluator.evaluate(FixedModel(reference))  # the first 200 reference images themselves
    m, p = same["metrics"], same["protocol"]
    # equal counts: the first 200 reference features against the 200 generated ones, which are the same images
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert p["prc_k"] == 3 and p["prc_num_real"] == 200 and p["prc_num_fake"] == 200
    assert "precision/recall: k=3, 200 real and 200 generated" in evaluator.protocol().describe()

    # mode collapse: 20 copies each of 10 reference images; every copy lies on a real point (precision 1) and the
    # generated spheres have radius 0 (k=5 < 19 duplicates), so at most the 10 originals of the 200 real are
    # covered (an exact duplicate's cdist distance is 0 up to rounding, hence "at most")
    collapsed = reference[:10].repeat(20, 1, 1, 1)
    again = Evaluator(extractor, FakeData(reference), ["precision", "recall"], 200, prc_k=5, **kwargs)
    calls = extractor.calls
    result = again.evaluate(FixedModel(collapsed))
    assert result["reference_cache_hit"] is True and extractor.calls - calls == 200  # no reference pass
    assert set(result["metrics"]) == {"precision", "recall"}
    assert result["metrics"]["precision"] == 1.0 and result["metrics"]["recall"] <= 10 / 200
    assert result["protocol"]["prc_k"] == 5
    only = Evaluator(extractor, FakeData(reference), ["recall"], 200, prc_k=5, **kwargs).evaluate(FixedModel(collapsed))
    assert set(only["metrics"]) == {"recall"} and only["metrics"]["recall"] == result["metrics"]["recall"]

    fresh = Evaluator(extractor, FakeData(reference), ["fid"], 200, **kwargs)
    assert fresh.protocol().prc_k is None and "precision/recall" not in fresh.protocol().describe()
    with pytest.raises(ValueError, match="prc_k=200"):
        Evaluator(extractor, FakeData(reference), ["recall"], 200, prc_k=200, **kwargs)


def test_generative_metrics_reset_keeps_the_reference() -> None:
    from atelier.metrics.cache import ReferenceStats

    extractor = PooledPixels()
    metrics = GenerativeMetrics(extractor, ["precision", "recall"])
    reference = blobs(100, 0)
    from atelier.metrics.protocol import to_uint8

    features = extractor(to_uint8(reference))["features"]
    metrics.set_reference(ReferenceStats.from_features(features, {}))
    metrics.update(reference)
    first = metrics.compute()
    metrics.reset()
    metrics.update(blobs(100, 1))
    second = metrics.compute()
    assert first == {"precision": 1.0, "recall": 1.0}
    assert second["precision"] < 1.0 and len(metrics.prc.real_features) == 1
