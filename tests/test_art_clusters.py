"""Self-labelled conditioning on a folder of images: k-means clusters replace the subfolder labels, on files the
test writes and on the real paintings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from atelier.data.art_folder import ArtFolderDataModule, fitted_pixels
from atelier.data.clusters import cluster_purity, feature_vectors
from atelier.data.label_counts import LABEL_COUNTS_KEY, stored_label_counts, train_label_counts
from atelier.metrics.art_features import ArtClassifierFeatures
from atelier.sampling.guidance import prior_labels
from atelier.tasks import sample as sample_task
from atelier.tasks import train as train_task
from atelier.tasks.evaluate import evaluation_labels
from atelier.tasks.sample import label_choice
from tests.conftest import DATA_DIR, TINY_DDPM, compose_cfg

COLOURS = ((220, 30, 30), (30, 200, 40), (40, 60, 230))


def colour_folder(root: Path, per_colour: int = 8) -> dict[str, int]:
    """Write ``3 per_colour`` noisy 24 px PNGs of three colours, spread over two subfolders (``a``, ``b``) so that
    folders and colours disagree; return each file's name → its colour index."""
    g = torch.Generator().manual_seed(0)
    kinds: dict[str, int] = {}
    for i in range(3 * per_colour):
        colour = i % 3
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        noise = torch.randint(-25, 26, (24, 24, 3), generator=g)
        pixels = (torch.tensor(COLOURS[colour]) + noise).clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
        kinds[f"img{i:02d}.png"] = colour
    return kinds


def all_labels(dm: ArtFolderDataModule) -> dict[str, int]:
    """File name → label over the whole folder (train and val splits share one list of paths)."""
    full = dm.train_set.dataset
    return {p.name: int(t) for p, t in zip(full.paths, full.targets, strict=True)}


def test_kmeans_labels_follow_the_colours_not_the_folders(tmp_path: Path) -> None:
    kinds = colour_folder(tmp_path / "art")
    args = {"root": str(tmp_path / "art"), "batch_size": 4, "val_fraction": 0.25, "hflip": False}
    folders = ArtFolderDataModule(**args, image_size=16)
    folders.setup()
    assert folders.num_classes == 2 and folders.classes == ["a", "b"]
    dm = ArtFolderDataModule(**args, image_size=16, labels="kmeans", num_clusters=3, cluster_image_size=8)
    dm.setup()
    assert dm.num_classes == 3 and dm.classes == ["cluster00", "cluster01", "cluster02"]
    labels = all_labels(dm)
    names = sorted(labels)
    ids = torch.tensor([labels[n] for n in names])
    colours = torch.tensor([kinds[n] for n in names])
    assert set(ids.tolist()) == {0, 1, 2} and cluster_purity(ids, colours) == 1.0  # one colour per cluster
    # the val split carries cluster ids too, and a batch's labels lie in [0, 3)
    assert dm.val_set.dataset.targets == dm.train_set.dataset.targets
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 3
    # clustered at cluster_image_size: another training size gives the same ids (a 32 px evaluation of a 16 px run)
    other = ArtFolderDataModule(**args, image_size=20, labels="kmeans", num_clusters=3, cluster_image_size=8)
    other.setup()
    assert all_labels(other) == labels
    assert train_label_counts(dm, 3).sum() == 18


def test_bad_cluster_settings_name_the_key(tmp_path: Path) -> None:
    colour_folder(tmp_path / "art", per_colour=2)
    root = str(tmp_path / "art")
    allowed = r"data\.labels='artists' is not allowed; choose one of \['folders', 'kmeans'\]"
    with pytest.raises(ValueError, match=allowed):
        ArtFolderDataModule(root, labels="artists")
    with pytest.raises(ValueError, match=r"data\.num_clusters must be in 2\.\.1000"):
        ArtFolderDataModule(root, labels="kmeans", num_clusters=1)
    dm = ArtFolderDataModule(root, image_size=8, labels="kmeans", num_clusters=7)
    with pytest.raises(ValueError, match=r"data\.num_clusters=7 exceeds the 6 images"):
        dm.setup()
    with pytest.raises(ValueError, match=r"data\.cluster_space='inception' is not allowed; choose one of "
                                         r"\['pixels', 'art_features'\]"):
        ArtFolderDataModule(root, labels="kmeans", cluster_space="inception")


def test_keep_labels_trains_on_the_chosen_classes_only(tmp_path: Path) -> None:
    kinds = colour_folder(tmp_path / "art")
    args = {"root": str(tmp_path / "art"), "batch_size": 4, "val_fraction": 0.25, "hflip": False, "image_size": 8}
    by_name = ArtFolderDataModule(**args, keep_labels=["b"])  # a folder by name: the 12 files of folder b
    by_name.setup()
    assert by_name.classes == ["b"] and by_name.num_classes == 1
    seen = [by_name.train_set.dataset.paths[i] for i in [*by_name.train_set.indices, *by_name.val_set.indices]]
    assert len(seen) == 12 and {p.parent.name for p in seen} == {"b"}
    assert len(by_name.val_set) == 3 and {int(y) for _, y in by_name.train_set} == {0}  # renumbered
    full = ArtFolderDataModule(**args, labels="kmeans", num_clusters=3, cluster_image_size=8)
    full.setup()
    cluster_of = all_labels(full)
    wanted = cluster_of["img01.png"]
    kept = ArtFolderDataModule(**args, labels="kmeans", num_clusters=3, cluster_image_size=8, keep_labels=[wanted])
    kept.setup()
    files = {kept.train_set.dataset.paths[i].name for i in [*kept.train_set.indices, *kept.val_set.indices]}
    assert files == {n for n, c in cluster_of.items() if c == wanted}  # the cluster, formed on all 24 images
    assert {kinds[n] for n in files} == {kinds["img01.png"]} and kept.classes == [f"cluster{wanted:02d}"]
    with pytest.raises(ValueError, match=r"data\.keep_labels: 'c' is not a class here; choose names of \['a', 'b'\]"):
        ArtFolderDataModule(**args, keep_labels=["c"]).setup()
    with pytest.raises(ValueError, match=r"data\.keep_labels=\[\] keeps nothing"):
        ArtFolderDataModule(**args, keep_labels=[])


def test_feature_vectors_are_unit_length_and_do_not_depend_on_the_batch() -> None:
    extractor = ArtClassifierFeatures()  # the pinned weights that ship with the package
    images = torch.randint(0, 256, (7, 40, 40, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    v = feature_vectors(extractor, images, batch_size=256)
    assert v.shape == (7, extractor.num_features) and v.dtype == torch.float32
    norms = v.norm(dim=1)
    assert bool(((norms - 1).abs() < 1e-5).all())
    torch.testing.assert_close(feature_vectors(extractor, images, batch_size=3), v, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, H, W, 1\|3\) images, got \(7, 3, 40, 40\)"):
        feature_vectors(extractor, images.permute(0, 3, 1, 2))


def test_real_paintings_cluster_and_prior_labels_follow_them() -> None:
    root = DATA_DIR / "art"
    if not any(root.glob("*/*.jpg")):
        pytest.fail(f"the art folder is needed in {root}: set ATELIER_DATA_DIR to ../shared/data")
    dm = ArtFolderDataModule(str(root), image_size=32, batch_size=8, labels="kmeans", num_clusters=30,
                             check_images=False)
    dm.setup()
    counts = train_label_counts(dm, 30)
    assert counts.sum() == len(dm.train_set) and bool((counts > 0).all())  # every cluster in the training split
    full = dm.train_set.dataset
    artists = ArtFolderDataModule(str(root), image_size=32, check_images=False)
    artists.setup()
    purity = cluster_purity(torch.tensor(full.targets), torch.tensor(artists.train_set.dataset.targets))
    # the clusters are palettes and layouts, not the artists (0.52 at 30 clusters; the folder labels would give 1)
    assert purity < 0.9
    labels = evaluation_labels("prior", 600, 30, dm)
    assert ((torch.bincount(labels, minlength=30) - counts / counts.sum() * 600).abs() < 1).all()


def test_feature_clusters_of_real_paintings_group_the_features_not_the_pixels(art_available: Path) -> None:
    """cluster_space=art_features clusters the art classifier's features: its clusters are tighter than the pixel
    clusters in that feature space, and looser in pixel space; they are the same at any training size."""
    args = {"root": str(art_available), "labels": "kmeans", "num_clusters": 30, "check_images": False}
    by_features = ArtFolderDataModule(**args, image_size=32, cluster_space="art_features")
    by_features.setup()
    by_pixels = ArtFolderDataModule(**args, image_size=32)
    by_pixels.setup()
    paths = by_features.train_set.dataset.paths
    assert paths == by_pixels.train_set.dataset.paths
    extractor = ArtClassifierFeatures()
    features = feature_vectors(extractor, fitted_pixels(paths, extractor.input_size))
    pixels = fitted_pixels(paths, 32).reshape(len(paths), -1).float() / 255

    def spread(points: torch.Tensor, ids: list[int]) -> float:
        """Mean squared distance of the points to their cluster's centre (k-means inertia per point)."""
        labels = torch.tensor(ids)
        centres = torch.stack([points[labels == c].mean(0) for c in range(30)])
        return float(((points - centres[labels]) ** 2).sum(1).mean())

    f_ids, p_ids = by_features.train_set.dataset.targets, by_pixels.train_set.dataset.targets
    assert sorted(set(f_ids)) == list(range(30)) and f_ids != p_ids
    assert spread(features, f_ids) < 0.8 * spread(features, p_ids)
    assert spread(pixels, p_ids) < 0.8 * spread(pixels, f_ids)
    other = ArtFolderDataModule(**args, image_size=20, cluster_space="art_features")
    other.setup()
    assert other.train_set.dataset.targets == f_ids


def test_scores_warn_when_the_labels_are_clusters_of_the_yardsticks_own_features(
        caplog: pytest.LogCaptureFixture) -> None:
    """Feature clusters of the pinned art classifier scored with that classifier: warned (and flagged), since
    guidance then moves samples along the compared features; any other pairing is silent."""
    from atelier.metrics.suite import labels_share_the_features
    from atelier.models.classifier import ClassifierNet

    pinned = ArtClassifierFeatures()
    other = ArtClassifierFeatures(net=ClassifierNet(image_size=64, channels=3, num_classes=3, width=4, feature_dim=8))
    features = ArtFolderDataModule("/nonexistent", labels="kmeans", cluster_space="art_features")
    pixels = ArtFolderDataModule("/nonexistent", labels="kmeans")
    folders = ArtFolderDataModule("/nonexistent")
    with caplog.at_level("WARNING", logger="atelier.metrics.suite"):
        assert labels_share_the_features(pinned, features)
    assert "k-means clusters of this extractor's features" in caplog.text and "seed=1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="atelier.metrics.suite"):
        assert not labels_share_the_features(other, features)  # another network: an independent yardstick
        assert not labels_share_the_features(pinned, pixels)
        assert not labels_share_the_features(pinned, folders)
    assert caplog.text == ""


def test_kmeans_art_experiment_trains_and_samples(tmp_path: Path) -> None:
    """The recipe composes (model.num_classes follows data.num_clusters), trains a tiny run, and evaluate.py's
    default label distribution for it is the clusters' prior."""
    cfg: DictConfig = compose_cfg("train", [
        "experiment=ddpm_kmeans_art_cpu", "data.num_clusters=16", "logger=csv", "print_config=false", *TINY_DDPM,
        "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "data.cache=false",
        "data.check_images=false", "trainer.max_steps=2", "trainer.limit_val_batches=1",
        "trainer.val_check_interval=2", "~callbacks.time_budget", "~callbacks.rich_progress_bar",
        "~callbacks.model_summary", "callbacks.sample_grid.num_samples=16", "callbacks.sample_grid.every_n_steps=0",
        "export_pipeline=false"], tmp_path)
    assert cfg.model.num_classes == 16 and cfg.data.labels == "kmeans" and cfg.sampling.label_distribution == "prior"
    assert cfg.model.guidance_scale == 3.0  # cluster guidance, stronger than the artist recipe's 2.0
    assert train_task.run(cfg)["global_step"] == 2
    model = sample_task.load_module(tmp_path / "checkpoints" / "last.ckpt")
    assert model.num_classes == 16 and model.net.class_embedding.num_embeddings == 17  # + the null class
    ckpt = str(tmp_path / "checkpoints" / "last.ckpt")
    assert label_choice(OmegaConf.create({"ckpt_path": ckpt, "label_distribution": None})) == "prior"
    # 16 samples of 16 clusters: a square 4 x 4 grid of 16 px RGB images with 2 px padding
    grid = Image.open(tmp_path / "samples" / "final.png")
    assert grid.size == (4 * 18 + 2, 4 * 18 + 2) and grid.mode == "RGB"

    # the checkpoint carries the clusters' training counts, so sample.py draws them by frequency without the data
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    counts = stored_label_counts(checkpoint)
    assert counts is not None and counts.shape == (16,) and int(counts.min()) > 0 and int(counts.sum()) > 2000
    info = sample_task.run(compose_cfg("sample", [f"ckpt_path={ckpt}", "num_samples=20", "num_inference_steps=2",
                                                  "save_images=false"], tmp_path / "prior"))
    assert info["label_distribution"] == "prior" and info["labels"] == prior_labels(20, counts).tolist()
    assert Image.open(info["grid"]).size == (4 * 18 + 2, 5 * 18 + 2)  # round(√20) = 4 a row, not a row per cluster
    info = sample_task.run(compose_cfg("sample", [f"ckpt_path={ckpt}", "num_samples=20", "num_inference_steps=2",
                                                  "save_images=false", "label_distribution=balanced"],
                                       tmp_path / "balanced"))
    assert info["label_distribution"] == "balanced" and info["labels"] is None  # the model's one-row-per-class
    listed = compose_cfg("sample", [f"ckpt_path={ckpt}", "num_samples=4", "class_labels=[3,5]"], tmp_path / "listed")
    assert sample_task.requested_labels(listed, conditional=True).tolist() == [3, 3, 5, 5]  # a list wins
    none = compose_cfg("sample", [f"ckpt_path={ckpt}", "num_samples=0"], tmp_path / "none")
    with pytest.raises(ValueError, match=r"num_samples=0 is not allowed; draw at least 1 image"):
        sample_task.run(none)
    bad = compose_cfg("sample", [f"ckpt_path={ckpt}", "label_distribution=uniform"], tmp_path / "bad")
    with pytest.raises(ValueError, match=r"label_distribution='uniform': allowed values are \['balanced', 'prior'\]"):
        sample_task.requested_labels(bad, conditional=True)
    del checkpoint[LABEL_COUNTS_KEY]  # a checkpoint written before the counts were stored
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old = compose_cfg("sample", [f"ckpt_path={tmp_path / 'old.ckpt'}", "num_samples=4"], tmp_path / "old")
    with pytest.raises(ValueError, match=r"stores no training label counts.*label_distribution=balanced"):
        sample_task.requested_labels(old, conditional=True)
