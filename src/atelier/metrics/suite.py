"""FID, KID and IS through torchmetrics, all fed by one pass of one feature extractor per batch.

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to real and generated features,
  ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))``; ``torchmetrics.image.FrechetInceptionDistance``.
- KID (Bińkowski et al. 2018): unbiased squared MMD with the cubic polynomial kernel, averaged over random
  subsets; ``torchmetrics.image.KernelInceptionDistance``.
- IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over splits; ``torchmetrics.image.InceptionScore``
  (with the MNIST classifier's logits it is the classifier-based score used for MNIST, at most 10).
- Precision and recall (Kynkäänniemi et al. 2019): fractions of generated features inside the real features'
  k-NN manifold and of real features inside the generated one; :class:`.precision_recall.PrecisionRecall`
  (torch-fidelity's computation). Not in the default set; ask for ``metrics=[fid,kid,precision,recall]``.

Each metric gets a :class:`FeatureHead` as its ``feature=`` module; the heads share a :class:`SharedExtractor`
that runs the network once per batch and hands each head its output (features or logits) in float64.
Metrics are computed where they were updated (``sync_on_compute=False``): the in-training callback evaluates on
rank 0 and broadcasts the values.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics.image import FrechetInceptionDistance, InceptionScore, KernelInceptionDistance

from atelier.metrics.cache import ReferenceStats
from atelier.metrics.precision_recall import DEFAULT_K, PrecisionRecall
from atelier.metrics.protocol import to_uint8

log = logging.getLogger(__name__)

#: every metric name ``metrics`` may hold
METRICS = ("fid", "kid", "is", "precision", "recall")
#: the metrics computed when none are named
DEFAULT_METRICS = ("fid", "kid", "is")
EXTRACTORS = ("mnist_classifier", "art_classifier", "art_simclr", "inception")
DEFAULT_KID_SUBSET_SIZE = 1000


def build_extractor(cfg: Mapping[str, Any] | nn.Module) -> nn.Module:
    """A feature extractor from its config (``feature_extractor`` group: ``name`` and that extractor's keys).

    Raises:
        ValueError: for an unknown ``feature_extractor.name`` (listing the allowed ones).
    """
    if isinstance(cfg, nn.Module):
        return cfg
    options = dict(cfg)
    name = options.pop("name", None)
    if name == "mnist_classifier":
        from atelier.metrics.mnist_features import MNISTClassifierFeatures

        return MNISTClassifierFeatures(**options)
    if name == "art_classifier":
        from atelier.metrics.art_features import ArtClassifierFeatures

        return ArtClassifierFeatures(**options)
    if name == "art_simclr":
        from atelier.metrics.art_features import ArtSimCLRFeatures

        return ArtSimCLRFeatures(**options)
    if name == "inception":
        from atelier.metrics.inception import InceptionFeatures

        return InceptionFeatures(**options)
    raise ValueError(f"feature_extractor={name!r} is not allowed; choose one of {list(EXTRACTORS)}")


def check_domain(extractor: nn.Module, dataset: Any, data_name: str) -> None:
    """Refuse a domain classifier's features for data of another domain.

    An extractor with a ``data_channels`` attribute (the MNIST digit classifier: 1) was trained on images with
    that many channels; data whose first image ``(C, H, W)`` has another ``C`` (RGB paintings) is not its
    domain: the FID would run (colour averaged to grey) and measure nothing the data is about.

    Raises:
        ValueError: naming the extractor, the data and the ``feature_extractor`` values that fit.
    """
    expected = getattr(extractor, "data_channels", None)
    if expected is None or len(dataset) == 0:
        return
    item = dataset[0]
    image = item[0] if isinstance(item, tuple | list) else item
    channels = int(image.shape[0]) if image.ndim == 3 else 1
    if channels != int(expected):
        raise ValueError(
            f"feature_extractor={extractor.name} was trained on {expected}-channel images and cannot score "
            f"{data_name} ({channels}-channel images): choose feature_extractor=art_classifier (paintings) or "
            f"inception (ImageNet; needs its weights); for the in-training FID: "
            f"feature_extractor@callbacks.fid.feature_extractor=art_classifier")


def labels_share_the_features(extractor: nn.Module, datamodule: Any) -> bool:
    """Whether ``datamodule``'s class labels are k-means clusters of ``extractor``'s own features
    (``data.labels=kmeans data.cluster_space=art_features`` scored with the pinned ``art_classifier``).

    Then a conditional model is guided towards the centres of the very feature clusters that FID, KID, precision
    and recall compare, and its scores are not independent of its conditioning (matching a feature network's class
    histogram lowers FID without better images: Kynkäänniemi et al. 2023, "The Role of ImageNet Classes in Fréchet
    Inception Distance"): logs a warning that says so and how to score with a second extractor. Returns ``True``
    in that case (a diagnostic; nothing is refused).
    """
    hparams = getattr(datamodule, "hparams", None) or {}
    if (getattr(extractor, "name", None) != "art_classifier" or hparams.get("labels") != "kmeans"
            or hparams.get("cluster_space") != "art_features"):
        return False
    from atelier.metrics.pinned import pinned_path
    from atelier.metrics.protocol import file_digest

    pinned = pinned_path("art_classifier")
    if not pinned.is_file() or getattr(extractor, "weights_sha256", None) != file_digest(pinned):
        return False
    log.warning("the labels of %s are k-means clusters of this extractor's features (data.cluster_space="
                "art_features, pinned art_classifier %s): guidance moves samples along the features these scores "
                "compare, so they are not independent of the conditioning. Score with a second extractor as well, "
                "e.g. an art classifier trained with another seed (python train.py experiment=art_classifier seed=1;"
                " feature_extractor.ckpt_path=<its classifier.ckpt>); docs/art.md, stop 40",
                type(datamodule).__name__, extractor.weights_sha256)
    return True


def check_metrics(metrics: Sequence[str]) -> list[str]:
    """Lower-cased metric names, checked against :data:`METRICS` (error names the ``metrics`` key)."""
    names = [str(m).lower() for m in metrics]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"metrics={list(metrics)} is not allowed; choose a non-empty subset of {list(METRICS)}")
    return names


class SharedExtractor(nn.Module):
    """Runs ``extractor`` once per input tensor and remembers the output for the other heads of that batch."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self._input: torch.Tensor | None = None
        self._output: dict[str, torch.Tensor] = {}
        self.seconds = 0.0
        self.images = 0

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images is not self._input:
            start = time.perf_counter()
            self._output = self.extractor(images)
            self.seconds += time.perf_counter() - start
            self.images += images.shape[0]
            self._input = images
        return self._output

    def clear(self) -> None:
        self._input, self._output = None, {}


class FeatureHead(nn.Module):
    """One output (``features`` or ``logits``) of a :class:`SharedExtractor`, in float64 ``(B, num_features)``."""

    def __init__(self, shared: SharedExtractor, key: str, num_features: int) -> None:
        super().__init__()
        self.shared = shared
        self.key = key
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.shared(images)[self.key].double()


class GenerativeMetrics(nn.Module):
    """FID/KID/IS and precision/recall of generated images against reference statistics, plus the
    predicted-class histogram.

    Args:
        extractor: a feature extractor (uint8 ``(B, C, H, W)`` → ``{"features", "logits"}``).
        metrics: subset of :data:`METRICS` (``fid``, ``kid``, ``is``, ``precision``, ``recall``).
        prc_k: k of the precision/recall k-NN radii (Kynkäänniemi et al. 2019 use 3); precision and recall are
            computed together from the first ``min(generated, reference)`` features of each side.
        kid_subsets: number of KID subsets.
        kid_subset_size: KID subset size; ``None`` adapts to ``min(1000, generated, reference)``; a size larger
            than the number of generated or reference images is an error.
        is_splits: Inception-Score splits.
        class_histogram: count the extractor's predicted classes (default: for domain classifiers, not Inception).

    Raises:
        ValueError: for unknown metric names, or ``is`` with an extractor that has no class logits
            (``num_classes`` 0, e.g. ``art_simclr``).
    """

    def __init__(self, extractor: nn.Module, metrics: Sequence[str] = DEFAULT_METRICS, kid_subsets: int = 100,
                 kid_subset_size: int | None = None, is_splits: int = 10, class_histogram: bool | None = None,
                 prc_k: int = DEFAULT_K) -> None:
        super().__init__()
        self.names = check_metrics(metrics)
        self.shared = SharedExtractor(extractor)
        features = FeatureHead(self.shared, "features", int(extractor.num_features))
        self.kid_subset_size = kid_subset_size
        self.is_splits = is_splits
        if "fid" in self.names:
            self.fid = FrechetInceptionDistance(feature=features, reset_real_features=False, sync_on_compute=False)
        with warnings.catch_warnings():  # torchmetrics warns that KID/IS keep all features: intended here
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            if "kid" in self.names:
                self.kid = KernelInceptionDistance(feature=features, subsets=kid_subsets, reset_real_features=False,
                                                   sync_on_compute=False)
            if "is" in self.names:
                if not int(getattr(extractor, "num_classes", 0) or 0):
                    raise ValueError(f"metrics: is needs class logits, and feature_extractor="
                                     f"{getattr(extractor, 'name', type(extractor).__name__)} has none; drop is "
                                     f"(e.g. metrics=[fid,kid,precision,recall])")
                logits = FeatureHead(self.shared, "logits", int(extractor.num_classes))
                self.inception_score = InceptionScore(feature=logits, splits=is_splits, sync_on_compute=False)
        if "precision" in self.names or "recall" in self.names:
            self.prc = PrecisionRecall(feature=features, k=prc_k, reset_real_features=False,
                                       sync_on_compute=False)
        if class_histogram is None:
            class_histogram = getattr(extractor, "name", "") != "inception"
        self.num_classes = int(getattr(extractor, "num_classes", 0)) if class_histogram else 0
        self.register_buffer("class_counts", torch.zeros(self.num_classes, dtype=torch.long), persistent=False)
        self.num_real = 0
        self.num_fake = 0
        self.num_correct = self.num_conditioned = 0

    def set_reference(self, stats: ReferenceStats) -> None:
        """Load reference statistics as the metrics' real side (same sums ``update(real=True)`` would give)."""
        f = stats.features.double().to(self.class_counts.device)
        if "fid" in self.names:
            self.fid.real_features_sum = f.sum(0)
            self.fid.real_features_cov_sum = f.T @ f
            self.fid.real_features_num_samples = torch.tensor(f.shape[0], device=f.device)
        if "kid" in self.names:
            self.kid.real_features = [f]
        if hasattr(self, "prc"):
            self.prc.real_features = [f]
        self.num_real = f.shape[0]

    @torch.no_grad()
    def update(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Add generated images: ``(B, C, H, W)`` float in ``[-1, 1]`` (quantised here) or uint8.

        ``labels`` ``(B,)`` int64, the classes the images were generated for, count towards the conditional
        accuracy (needs a domain classifier's logits).
        """
        x = to_uint8(images)
        if "fid" in self.names:
            self.fid.update(x, real=False)
        if "kid" in self.names:
            self.kid.update(x, real=False)
        if "is" in self.names:
            self.inception_score.update(x)
        if hasattr(self, "prc"):
            self.prc.update(x, real=False)
        if self.num_classes:
            predicted = self.shared(x)["logits"].argmax(1)
            self.class_counts += torch.bincount(predicted, minlength=self.num_classes).to(self.class_counts.device)
            if labels is not None:
                self.num_conditioned += labels.numel()
                self.num_correct += int((predicted.cpu() == labels.cpu()).sum())
        self.shared.clear()
        self.num_fake += x.shape[0]

    def resolve_kid_subset_size(self) -> int:
        """The KID subset size to use for the current sample counts.

        Raises:
            ValueError: when ``kid_subset_size`` exceeds the generated or reference count (naming the keys).
        """
        available = min(self.num_fake, self.num_real)
        if self.kid_subset_size is None:
            size = min(DEFAULT_KID_SUBSET_SIZE, available)
            if size < 2:
                raise ValueError(f"KID needs at least 2 generated and 2 reference images, got {self.num_fake} and "
                                 f"{self.num_real}: raise num_samples / reference_size")
            return size
        if self.kid_subset_size > available:
            raise ValueError(
                f"kid_subset_size={self.kid_subset_size} is larger than the {self.num_fake} generated (num_samples) "
                f"or {self.num_real} reference (reference_size) images; lower kid_subset_size, raise num_samples, "
                f"or set kid_subset_size=null to adapt it to min(1000, num_samples, reference_size)"
            )
        return int(self.kid_subset_size)

    @torch.no_grad()
    def compute(self, seed: int = 0) -> dict[str, Any]:
        """Metric values; KID/IS subset draws use ``seed`` (same seed, same numbers)."""
        out: dict[str, Any] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if "fid" in self.names:
                out["fid"] = float(self.fid.compute())
            if "kid" in self.names:
                self.kid.subset_size = self.resolve_kid_subset_size()
                mean, std = self.kid.compute()
                out.update(kid=float(mean), kid_std=float(std), kid_subset_size=self.kid.subset_size)
            if "is" in self.names:
                if self.num_fake < self.is_splits:
                    raise ValueError(f"IS with is_splits={self.is_splits} needs at least that many samples "
                                     f"(num_samples={self.num_fake})")
                mean, std = self.inception_score.compute()
                out.update(**{"is": float(mean), "is_std": float(std)})
            if hasattr(self, "prc"):
                prc = self.prc.compute()
                out.update({name: prc[name] for name in ("precision", "recall") if name in self.names})
        if self.num_classes:
            out.update(class_statistics(self.class_counts.cpu()))
            if self.num_conditioned:
                out["cond_accuracy"] = self.num_correct / self.num_conditioned
        return out

    def reset(self) -> None:
        """Forget the generated side (the reference statistics stay)."""
        for attr in ("fid", "kid", "inception_score", "prc"):
            if hasattr(self, attr):
                getattr(self, attr).reset()
        self.class_counts.zero_()
        self.num_fake = 0
        self.num_correct = self.num_conditioned = 0
        self.shared.seconds, self.shared.images = 0.0, 0


def class_statistics(counts: torch.Tensor) -> dict[str, Any]:
    """Mode-coverage view of predicted classes: histogram, coverage and normalised entropy.

    ``class_coverage`` is the fraction of classes that receive at least half their uniform share
    (``count >= n / (2 C)``); ``class_entropy`` is the entropy of the histogram divided by ``log C`` (1 = uniform).
    """
    n, c = int(counts.sum()), counts.numel()
    p = counts.double() / max(n, 1)
    entropy = float((p[p > 0] * p[p > 0].log()).sum().neg() / torch.log(torch.tensor(float(c)))) + 0.0
    covered = int((counts.double() >= n / (2 * c)).sum()) if n else 0
    return {"class_histogram": counts.tolist(), "class_coverage": covered / c, "class_entropy": entropy}
