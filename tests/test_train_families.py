"""Every model family through the real train and sample tasks: fast_dev_run on each model x data pair, exact
resume (both GAN optimisers, EMA, VAE) and ``sample.py`` from a checkpoint of each family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atelier.callbacks.samples import save_grid
from atelier.tasks import sample as sample_task
from atelier.tasks import train as train_task
from tests.conftest import TINY, compose_cfg

SHORT = ["trainer.limit_train_batches=5", "trainer.limit_val_batches=1", "data.val_size=64",
         "callbacks.model_checkpoint.every_n_train_steps=null", "trainer.log_every_n_steps=1"]


@pytest.mark.parametrize("model", ["gan", "gan_hinge_sn", "gan_wgan_gp", "vae"])
@pytest.mark.parametrize("data", ["mnist", "art"])
def test_fast_dev_run_each_model_data_pair(train_cfg, mnist_available, model: str, data: str) -> None:
    cfg = train_cfg(f"data={data}", "data.image_size=16", "debug=fdr", model=model)
    metrics = train_task.run(cfg)
    out = Path(cfg.paths.output_dir)
    loss_key = "train/loss" if model == "vae" else "train/d_loss"
    assert torch.isfinite(torch.tensor(metrics[loss_key]))
    assert (out / "samples" / "final.png").is_file()
    assert (out / "samples" / "interpolation_final.png").is_file()
    if model == "vae":
        assert (out / "samples" / "reconstruction_final.png").is_file()


def test_conditional_gan_on_mnist_labels(train_cfg, tmp_path: Path, mnist_available) -> None:
    cfg = train_cfg("data.image_size=16", *SHORT, "trainer.max_steps=4", "model.generator.num_classes=10",
                    model="gan")
    train_task.run(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    model = sample_task.load_module(ckpt)
    assert model.num_classes == 10
    assert model.discriminator.head.embed.num_embeddings == 10  # projection discriminator
    # sample.py class_label=3 draws every image of class 3 from the same latents as model.sample(labels=3)
    scfg = compose_cfg("sample", [f"ckpt_path={ckpt}", "num_samples=4", "class_label=3", "save_images=false"],
                       tmp_path / "sample")
    info = sample_task.run(scfg)
    assert info["class_label"] == 3
    expected = model.sample(4, generator=torch.Generator().manual_seed(0), labels=torch.full((4,), 3))
    cycled = model.sample(4, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(expected, cycled)
    save_grid(expected, tmp_path / "expected.png")
    assert (tmp_path / "sample" / "grid.png").read_bytes() == (tmp_path / "expected.png").read_bytes()
    # a class the model does not have is refused before sampling, naming the key and the range
    bad = compose_cfg("sample", [f"ckpt_path={ckpt}", "num_samples=4", "class_labels=[3,10]", "save_images=false"],
                      tmp_path / "bad")
    with pytest.raises(ValueError, match=r"class_labels=\[3, 10\]: \[10\] outside this model's 10 classes; choose "
                                         r"from 0 to 9"):
        sample_task.run(bad)


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tree(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("model", ["gan", "gan_channels_last", "vae"])
def test_resume_matches_uninterrupted_run(tmp_path: Path, mnist_available, model: str) -> None:
    channels_last = model == "gan_channels_last"
    model = "gan" if channels_last else model
    common = [f"model={model}", *TINY[model], *SHORT, "logger=csv", "print_config=false", "data.image_size=16",
              "data.batch_size=8", "callbacks.sample_grid.every_n_steps=0",
              "callbacks.sample_grid.on_train_end=false", "~callbacks.rich_progress_bar", "export_pipeline=false"]
    if model == "gan":
        common += ["model.r1_gamma=1.0", "model.r1_interval=2", "model.diffaugment=translation",
                   f"model.channels_last={str(channels_last).lower()}"]
    full = compose_cfg("train", [*common, "trainer.max_epochs=2"], tmp_path / "full")
    half = compose_cfg("train", [*common, "trainer.max_epochs=1"], tmp_path / "half")
    train_task.run(full)
    train_task.run(half)
    resumed = compose_cfg("train", [*common, "trainer.max_epochs=2",
                                    f"ckpt_path={tmp_path / 'half' / 'checkpoints' / 'last.ckpt'}"],
                          tmp_path / "resumed")
    train_task.run(resumed)
    a = _checkpoint(tmp_path / "full/checkpoints/last.ckpt")
    b = _checkpoint(tmp_path / "resumed/checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == (20 if model == "gan" else 10)
    _assert_same_tree(a["state_dict"], b["state_dict"], "state_dict")
    assert len(a["optimizer_states"]) == (2 if model == "gan" else 1)
    _assert_same_tree(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    if model == "gan":
        assert any(k.startswith("ema.module.") for k in a["state_dict"])
        assert int(a["state_dict"]["d_steps"]) == 10


@pytest.mark.parametrize("model", ["gan", "vae"])
def test_sample_task_from_each_family(train_cfg, tmp_path: Path, mnist_available, model: str) -> None:
    cfg = train_cfg("data.image_size=16", *SHORT, "trainer.max_steps=4", model=model)
    train_task.run(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    # num_inference_steps is a DDPM option: other families ignore it with a warning instead of failing
    scfg = compose_cfg("sample", [f"ckpt_path={ckpt}", "num_samples=5", "num_inference_steps=3"],
                       tmp_path / "sample")
    info = sample_task.run(scfg)
    assert info["shape"] == [5, 1, 16, 16]
    assert (tmp_path / "sample" / "grid.png").is_file()
    assert len(list((tmp_path / "sample" / "images").glob("*.png"))) == 5
    assert json.loads((tmp_path / "sample" / "sample_info.json").read_text())["sample_kwargs"] == {"batch_size": 256}
    model_ = sample_task.load_module(ckpt)
    a = model_.sample(3, generator=torch.Generator().manual_seed(0))
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, model_.sample(3, generator=torch.Generator().manual_seed(0)))
    # an unconditional model refuses a class instead of ignoring it
    labelled = compose_cfg("sample", [f"ckpt_path={ckpt}", "num_samples=2", "class_label=1"], tmp_path / "labelled")
    with pytest.raises(ValueError, match=r"class_label=1 was given, but this checkpoint's model is unconditional"):
        sample_task.run(labelled)
