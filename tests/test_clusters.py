"""Self-labelled conditioning: k-means pseudo-labels of unlabelled images, on synthetic data and on real MNIST."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from atelier.callbacks.samples import class_rows
from atelier.data.clusters import cluster_purity, kmeans_labels
from atelier.data.label_counts import train_label_counts
from atelier.data.mnist import MNISTDataModule
from atelier.tasks import sample as sample_task
from atelier.tasks import train as train_task
from atelier.tasks.evaluate import evaluation_labels
from atelier.tasks.sample import label_choice
from tests.conftest import TINY_DDPM, compose_cfg


def three_blobs(n_per: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(3 n_per, 8, 8)`` images of three kinds (dark, bright, left half bright) with noise, and their kinds."""
    g = torch.Generator().manual_seed(0)
    kinds = torch.arange(3).repeat_interleave(n_per)
    base = torch.zeros(3, 8, 8)
    base[1] = 200
    base[2, :, :4] = 200
    noise = torch.randint(0, 40, (3 * n_per, 8, 8), generator=g).float()
    return (base[kinds] + noise).clamp(0, 255).to(torch.uint8), kinds


def test_kmeans_recovers_separated_groups_and_is_deterministic() -> None:
    images, kinds = three_blobs()
    ids = kmeans_labels(images, 3, seed=1, pca_dim=5)
    assert ids.shape == (120,) and ids.dtype == torch.int64 and set(ids.tolist()) == {0, 1, 2}
    assert cluster_purity(ids, kinds) == 1.0  # each group is one cluster
    assert torch.equal(ids, kmeans_labels(images, 3, seed=1, pca_dim=5))  # same seed, same ids
    # more clusters than groups: still pure, every id used
    six = kmeans_labels(images, 6, seed=1, pca_dim=5)
    assert set(six.tolist()) == set(range(6)) and cluster_purity(six, kinds) == 1.0


def test_cluster_purity_and_errors() -> None:
    clusters = torch.tensor([0, 0, 0, 1, 1, 1])
    assert cluster_purity(clusters, torch.tensor([5, 5, 2, 3, 3, 3])) == pytest.approx(5 / 6)
    assert cluster_purity(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 3])) == 0.25
    with pytest.raises(ValueError, match="must be equal"):
        cluster_purity(clusters, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"num_clusters=1 must lie in \[2, 120\]"):
        kmeans_labels(three_blobs()[0], 1)
    allowed = r"data\.labels='clusters' is not allowed; choose one of \['digits', 'kmeans'\]"
    with pytest.raises(ValueError, match=allowed):
        MNISTDataModule(labels="clusters")
    with pytest.raises(ValueError, match=r"data\.num_clusters must be in 2\.\.1000"):
        MNISTDataModule(labels="kmeans", num_clusters=1)


def test_mnist_kmeans_labels_replace_the_digits(mnist_available: Path) -> None:
    dm = MNISTDataModule(str(mnist_available), image_size=28, val_size=2000, labels="kmeans", num_clusters=20)
    assert dm.num_classes == 20 and MNISTDataModule(str(mnist_available)).num_classes == 10
    dm.setup("fit")
    counts = train_label_counts(dm, 20)
    assert counts.sum() == 58000 and bool((counts > 0).all())  # every cluster present in the training split
    _, label = dm.train_set[0]
    assert 0 <= label < 20
    full = dm.train_set.dataset
    digits = MNISTDataModule(str(mnist_available), image_size=28, val_size=2000)
    digits.setup("fit")
    truth = digits.train_set.dataset.targets
    assert not torch.equal(full.targets, truth)
    # the clusters follow the digits without being told them: far above the 0.11 of the largest digit class
    assert cluster_purity(full.targets, truth) > 0.6
    # prior labels for an evaluation follow the clusters' frequencies
    labels = evaluation_labels("prior", 1000, 20, dm)
    assert labels.shape == (1000,)
    assert ((torch.bincount(labels, minlength=20) - counts / counts.sum() * 1000).abs() < 1).all()
    # the test set keeps its digits
    assert int(dm.test_set.targets.max()) == 9


def test_many_classes_fill_a_square_grid() -> None:
    class M:
        def __init__(self, k: int | None) -> None:
            self.num_classes = k

    assert class_rows(M(10), 100) == 10 and class_rows(M(3), 24) == 8  # one class per row
    assert class_rows(M(100), 100) is None and class_rows(M(50), 100) is None  # square grid
    assert class_rows(M(None), 100) is None


def test_kmeans_experiment_trains_and_samples(tmp_path: Path, mnist_available: Path) -> None:
    """The recipe composes (model.num_classes follows data.num_clusters) and a tiny run of it trains and samples."""
    cfg: DictConfig = compose_cfg("train", [
        "experiment=ddpm_kmeans_mnist_cpu", "data.num_clusters=20", "logger=csv", "print_config=false",
        *TINY_DDPM, "data.image_size=16", "data.batch_size=8", "trainer.max_steps=2", "trainer.limit_val_batches=1",
        "trainer.val_check_interval=2", "~callbacks.time_budget", "~callbacks.rich_progress_bar",
        "~callbacks.model_summary", "callbacks.sample_grid.num_samples=16", "callbacks.sample_grid.every_n_steps=0",
        "export_pipeline=false"], tmp_path)
    assert cfg.model.num_classes == 20 and cfg.data.labels == "kmeans"
    assert cfg.model.guidance_scale == 1.2 and cfg.sampling.label_distribution == "prior"
    metrics = train_task.run(cfg)
    assert metrics["global_step"] == 2
    model = sample_task.load_module(tmp_path / "checkpoints" / "last.ckpt")
    assert model.num_classes == 20 and model.net.class_embedding.num_embeddings == 21
    # evaluate.py samples the clusters by their frequencies unless told otherwise (the recipe's sampling default)
    ckpt = str(tmp_path / "checkpoints" / "last.ckpt")
    assert label_choice(OmegaConf.create({"ckpt_path": ckpt, "label_distribution": None})) == "prior"
    # 16 samples, 20 clusters: a square 4 x 4 grid of 16 px images with 2 px padding
    assert Image.open(tmp_path / "samples" / "final.png").size == (4 * 18 + 2, 4 * 18 + 2)
