"""Restoration: degradations (shapes, σ, masks), PSNR against the analytic value, the module through the real train
task, and the restore task on files of any mode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from atelier.callbacks.checkpoint_extras import CONFIG_KEY
from atelier.models.restore import Restoration
from atelier.restore.degradations import (
    Chain,
    Downsample,
    GaussianBlur,
    GaussianNoise,
    MotionBlur,
    RandomMask,
    check_names,
    motion_kernel,
)
from atelier.style.io import read_png_metadata
from atelier.tasks import restore as restore_task
from atelier.tasks import sample as sample_task
from atelier.tasks import train as train_task
from tests.conftest import DATA_DIR, compose_cfg

TINY_RESTORE = ["model.net.block_out_channels=[16,32]", "model.net.norm_num_groups=8"]
TRAIN_BASE = ["model=restore", "logger=csv", "print_config=false", "data=art", "data.image_size=32",
              "data.batch_size=8", "data.num_workers=0", "callbacks.sample_grid.num_samples=4",
              "~callbacks.rich_progress_bar", "~callbacks.model_summary", *TINY_RESTORE]
NAMES = ["noise", "blur", "motion", "down2", "down4", "inpaint"]


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth mid-range test images in [-0.5, 0.5] (noise of σ = 0.1 rarely leaves [-1, 1])."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g) - 0.5
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------- degradations
@pytest.mark.parametrize("sigma", [0.05, 0.1, 0.2])
def test_gaussian_noise_has_the_configured_sigma(sigma: float) -> None:
    x = _images(8, 64)
    y = GaussianNoise(sigma=sigma, clip=False)(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    measured = ((y - x) / 2).std().item()  # σ is in [0, 1] intensity units, the images in [-1, 1]
    assert measured == pytest.approx(sigma, rel=0.02)
    per_image = GaussianNoise(sigma=[0.0, 0.2], clip=False)(x, torch.Generator().manual_seed(0))
    stds = ((per_image - x) / 2).flatten(1).std(dim=1)
    assert stds.min() < stds.max() and stds.max() <= 0.21
    assert GaussianNoise(sigma=0.5)(x).abs().max() <= 1  # clipped to the valid range by default


def test_blurs_keep_shape_mean_and_constants() -> None:
    x = _images(2, 32) + 0.3 * torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for blur in (GaussianBlur(sigma=1.5, clip=False), MotionBlur(length=7, clip=False),
                 MotionBlur(length=[3, 9], angle=45, clip=False)):
        y = blur(x, torch.Generator().manual_seed(0))
        assert y.shape == x.shape
        assert y.mean().item() == pytest.approx(x.mean().item(), abs=0.02)
        assert y.var() < x.var()  # smoother
        constant = torch.full((1, 3, 16, 16), 0.25)
        torch.testing.assert_close(blur(constant), constant)
    k = motion_kernel(length=7, angle=0, size=9)
    assert k.sum().item() == pytest.approx(1.0) and k[4].sum() > 0.99  # horizontal line through the centre row


@pytest.mark.parametrize("factor", [2, 4])
def test_downsampling_produces_the_configured_shapes(factor: int) -> None:
    x = _images(2, 32)
    d = Downsample(name=f"down{factor}", factor=factor)
    assert d.down(x).shape == (2, 3, 32 // factor, 32 // factor)
    y = d(x)
    assert y.shape == x.shape
    assert 0 < (y - x).abs().mean() < 0.1  # smooth images survive, but not exactly


def test_random_masks_fill_holes_and_leave_the_rest() -> None:
    x = _images(16, 32)
    d = RandomMask(max_boxes=3, min_size=0.1, max_size=0.3, fill=0.0)
    holes = d.mask(x.shape, torch.Generator().manual_seed(0))
    y = d(x, torch.Generator().manual_seed(0))
    assert holes.shape == (16, 1, 32, 32) and holes.dtype == torch.bool
    fraction = holes.float().flatten(1).mean(1)
    assert (fraction >= 0.009).all() and (fraction <= 3 * 0.3**2 + 0.01).all()  # one to three 3..10 px boxes
    assert torch.equal(y, torch.where(holes, torch.zeros_like(x), x))


def test_chain_names_and_determinism() -> None:
    x = _images(2, 32)
    chain = Chain("blur_noise", [GaussianBlur(sigma=1.0), GaussianNoise(sigma=0.05)])
    a, b = chain(x, torch.Generator().manual_seed(3)), chain(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    with pytest.raises(ValueError, match="repeated"):
        check_names([GaussianNoise("n"), GaussianBlur("n")])


def test_degradations_configured_in_yaml() -> None:
    cfg = compose_cfg("train", ["model=restore", "data=art", "data.image_size=32", *TINY_RESTORE])
    model = hydra.utils.instantiate(cfg.model)
    assert model.names == NAMES
    assert model.degradation("noise").sigma == (0.1, 0.1)
    assert model.degradation("down4").factor == 4
    with pytest.raises(KeyError, match="down8"):
        model.degradation("down8")
    x = _images(6, 32)
    torch.testing.assert_close(model.restore(x), x)  # residual UNet with a zero output layer starts as the identity


# ----------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("sigma", [0.05, 0.1])
def test_psnr_of_an_identity_prediction_equals_the_analytic_value(sigma: float) -> None:
    """Identity 'restoration' of y = x + n, n ~ N(0, σ²): PSNR = 10·log10(1² / σ²) on [0, 1] intensities."""
    model = Restoration(nn.Identity(), torch.optim.Adam, [GaussianNoise("noise", sigma=sigma, clip=False)],
                        residual=False)
    loader = DataLoader(TensorDataset(_images(32, 64)), batch_size=8)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    metrics = trainer.validate(model, loader, verbose=False)[0]
    analytic = 10 * math.log10(1.0 / sigma**2)
    assert metrics["val/psnr/noise"] == pytest.approx(analytic, abs=0.1)
    assert metrics["val/psnr_input/noise"] == pytest.approx(metrics["val/psnr/noise"], abs=1e-4)
    assert metrics["val/loss/noise"] == pytest.approx(2 * sigma * math.sqrt(2 / math.pi), rel=0.02)  # E|2σz|
    assert 0 < metrics["val/ssim/noise"] < 1


# ----------------------------------------------------------------------------------------------- train task
def test_fast_dev_run_logs_psnr_and_ssim_per_degradation(tmp_path: Path) -> None:
    cfg = compose_cfg("train", [*TRAIN_BASE, "debug=fdr"], tmp_path)
    metrics = train_task.run(cfg)
    for name in NAMES:
        assert math.isfinite(metrics[f"val/psnr/{name}"]) and 0 < metrics[f"val/ssim/{name}"] <= 1
        assert f"val/psnr_input/{name}" in metrics
    assert math.isfinite(metrics["train/loss"]) and "val/psnr" in metrics and "val/ssim" in metrics
    assert (tmp_path / "samples" / "restoration_final.png").is_file()
    assert not (tmp_path / "samples" / "final.png").exists()  # no sample(): image-to-image grids only


def test_experiment_config_composes(tmp_path: Path) -> None:
    cfg = compose_cfg("train", ["experiment=restore_art_cpu"], tmp_path)
    assert cfg.model._target_ == "atelier.models.restore.Restoration" and cfg.trainer.accelerator == "cpu"
    assert cfg.optimized_metric == "val/psnr"
    OmegaConf.to_container(cfg, resolve=True)


# ----------------------------------------------------------------------------------------------- restore task
@pytest.fixture
def restore_ckpt(tmp_path: Path) -> Path:
    """An (untrained, identity-initialised) restoration checkpoint in the train task's format."""
    cfg = compose_cfg("train", ["model=restore", "data=art", "data.image_size=32", *TINY_RESTORE], tmp_path)
    module = hydra.utils.instantiate(cfg.model)
    path = tmp_path / "restore.ckpt"
    torch.save({"state_dict": module.state_dict(),
                CONFIG_KEY: {"model": OmegaConf.to_container(cfg.model, resolve=True)}}, path)
    return path


def _inputs(folder: Path) -> Path:
    rgb = Image.fromarray(np.random.default_rng(0).integers(60, 200, (30, 42, 3), dtype=np.uint8))
    (folder / "sub").mkdir(parents=True)
    rgb.convert("L").save(folder / "grey.png")
    rgb.convert("RGBA").save(folder / "sub" / "alpha.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    return folder


def _restore_cfg(tmp_path: Path, ckpt: Path, *overrides: str):
    return compose_cfg("restore", [f"ckpt_path={ckpt}", "~logger", *overrides], tmp_path / "run")


def test_restore_task_on_a_folder_of_any_mode(tmp_path: Path, restore_ckpt: Path) -> None:
    folder = _inputs(tmp_path / "in")
    cfg = _restore_cfg(tmp_path, restore_ckpt, f"input={folder}")
    info = restore_task.run(cfg)
    out = Path(cfg.paths.output_dir)
    assert info["images"] == 3
    for name in ("grey.png", "cmyk.png", "sub/alpha.png"):
        assert Image.open(out / "restored" / name).size == (42, 30)  # odd sizes are padded and cropped back
        assert (out / "panels" / name).is_file()
    assert read_png_metadata(out / "restored" / "grey.png")["ckpt_path"] == str(restore_ckpt)


def test_restore_task_with_synthetic_degradation_reports_psnr(tmp_path: Path, restore_ckpt: Path) -> None:
    photo = DATA_DIR / "content" / "sailboat.jpg"
    cfg = _restore_cfg(tmp_path, restore_ckpt, f"input={photo}", "degrade=noise", "size=64")
    info = restore_task.run(cfg)
    row = info["results"][0]
    # the untrained model is the identity, so restored PSNR = degraded PSNR ≈ 20 dB for σ = 0.1 (a little
    # higher: clipping to the valid range removes some noise)
    assert row["psnr"] == pytest.approx(row["psnr_input"], abs=1e-3) and 19.5 < row["psnr"] < 22
    assert json.loads((Path(cfg.paths.output_dir) / "restore_info.json").read_text())["mean_psnr"] == row["psnr"]
    assert Image.open(Path(cfg.paths.output_dir) / "panels" / "sailboat.png").size[0] > 3 * 64


def test_restore_task_errors_name_the_input(tmp_path: Path, restore_ckpt: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        restore_task.run(_restore_cfg(tmp_path, restore_ckpt, f"input={tmp_path / 'missing.png'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no image"):
        restore_task.run(_restore_cfg(tmp_path, restore_ckpt, f"input={tmp_path / 'empty'}"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match=r"bad\.jpg"):
        restore_task.run(_restore_cfg(tmp_path, restore_ckpt, f"input={bad}"))
    with pytest.raises(KeyError, match="down8"):
        restore_task.run(_restore_cfg(tmp_path, restore_ckpt, f"input={DATA_DIR / 'content' / 'sailboat.jpg'}",
                                      "degrade=down8"))


@pytest.mark.slow
def test_short_training_beats_the_degraded_input(tmp_path: Path) -> None:
    """60 real steps on noisy paintings: the restored PSNR rises above the noisy input's."""
    cfg = compose_cfg("train", [*TRAIN_BASE, "trainer=cpu", "trainer.max_steps=60", "trainer.limit_val_batches=2",
                                "trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=60",
                                "callbacks.sample_grid.every_n_steps=0",
                                "callbacks.model_checkpoint.every_n_train_steps=null",
                                "model.optimizer.lr=2e-3", "trainer.log_every_n_steps=10",
                                "model.degradations=[{_target_: atelier.restore.degradations.GaussianNoise, "
                                "name: noise, sigma: 0.1}]"], tmp_path)
    metrics = train_task.run(cfg)
    assert metrics["val/psnr/noise"] > metrics["val/psnr_input/noise"] + 1.0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_sample_task_points_image_to_image_checkpoints_to_restore_py(tmp_path: Path, restore_ckpt: Path) -> None:
    cfg = compose_cfg("sample", [f"ckpt_path={restore_ckpt}", "num_samples=2"], tmp_path / "sample")
    with pytest.raises(TypeError, match=r"restore\.py"):
        sample_task.run(cfg)
