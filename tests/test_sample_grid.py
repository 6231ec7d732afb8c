"""SampleGrid: a model that has no grid to draw (a classifier: neither ``sample`` nor ``visualizations``) is
skipped with one info line, not an error, so the default callbacks serve every model; a DDPM's grid is sampled
under the hardware precision rule of sample.py and evaluate.py."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning import LightningModule

from atelier.callbacks.samples import SampleGrid
from atelier.models.ddpm import DDPM
from atelier.nets.unet import build_unet
from atelier.tasks import train as train_task
from atelier.utils.precision import FLAGS_ENV
from tests.conftest import compose_cfg

NO_GRID = "has neither sample(n, generator) nor visualizations()"

# tests/test_ddp.py's tiny classifier, with the default callbacks' sample_grid kept (and drawing every 2 steps)
CLASSIFIER = ["model=classifier", "data=mnist", "data.image_size=28", "data.batch_size=16", "data.num_workers=0",
              "logger=csv", "print_config=false", "~callbacks.rich_progress_bar", "~callbacks.model_summary",
              "callbacks.sample_grid.every_n_steps=2", "model.net.width=4", "model.net.feature_dim=16",
              "model.test_on_train_end=false", "trainer.max_steps=3", "trainer.limit_val_batches=1",
              "trainer.val_check_interval=3", "trainer.check_val_every_n_epoch=null", "export_pipeline=false"]


def test_draw_skips_a_module_without_sample_or_visualizations(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    grid = SampleGrid(str(tmp_path / "samples"))
    with caplog.at_level(logging.INFO, logger="atelier.callbacks.samples"):
        assert grid.draw(None, LightningModule(), "step_0000002") == []
        assert grid.draw(None, LightningModule(), "final") == []
    lines = [r for r in caplog.records if NO_GRID in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "LightningModule" in lines[0].getMessage()
    assert not (tmp_path / "samples").exists() and grid.paths == []


def test_classifier_trains_with_default_callbacks(tmp_path: Path, mnist_available: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cfg = compose_cfg("train", CLASSIFIER, tmp_path)
    assert cfg.callbacks.sample_grid is not None  # the default callbacks, grid included
    with caplog.at_level(logging.INFO):
        train_task.run(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert not list(tmp_path.glob("samples/*.png"))
    lines = [r.getMessage() for r in caplog.records if NO_GRID in r.getMessage()]
    assert lines == [f"SampleGrid: MNISTClassifier {NO_GRID}; no sample grids are drawn for it"]


def test_mnist_classifier_experiment_composes_without_grid(tmp_path: Path) -> None:
    cfg = compose_cfg("train", ["experiment=mnist_classifier"], tmp_path)
    assert cfg.model._target_.endswith("MNISTClassifier") and cfg.callbacks.sample_grid is None
    assert cfg.callbacks.stable_checkpoint.monitor == "val/acc"


def tiny_ddpm() -> DDPM:
    torch.manual_seed(0)
    net = build_unet(8, 1, block_out_channels=(16, 32), layers_per_block=1, attention_resolutions=(),
                     norm_num_groups=8)
    return DDPM(net, functools.partial(torch.optim.Adam, lr=1e-3))


@pytest.mark.parametrize(("flags", "grid_kwargs", "expected"), [
    ("amx_bf16,avx512_bf16", {}, torch.bfloat16),                      # Sapphire Rapids: bf16 pays
    ("AuthenticAMD,avx512_bf16", {}, torch.bfloat16),                  # Zen 4
    ("avx2,fma", {}, torch.float32),                                   # AVX2-only EPYC: fp32
    ("amx_bf16,avx512_bf16", {"autocast": False}, torch.float32),      # the callback's switch
    ("amx_bf16,avx512_bf16", {"sample_kwargs": {"autocast": False}}, torch.float32),  # sample_kwargs win
])
def test_ddpm_grid_samples_under_the_hardware_precision_rule(
        flags: str, grid_kwargs: dict, expected: torch.dtype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FLAGS_ENV, flags)
    model = tiny_ddpm()
    dtypes: set[torch.dtype] = set()

    def record(module: torch.nn.Module, args: object, output: object) -> None:
        if isinstance(module, torch.nn.Conv2d) and isinstance(output, torch.Tensor):
            dtypes.add(output.dtype)

    kwargs = {"sample_kwargs": {"num_inference_steps": 2}, **grid_kwargs}
    if "sample_kwargs" in grid_kwargs:
        kwargs["sample_kwargs"] = {"num_inference_steps": 2, **grid_kwargs["sample_kwargs"]}
    grid = SampleGrid(str(tmp_path / "samples"), num_samples=2, **kwargs)
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        paths = grid.draw(SimpleNamespace(global_step=0, loggers=[]), model, "final")
    finally:
        handle.remove()
    assert dtypes == {expected}
    assert [p.name for p in paths] == ["final.png"] and paths[0].stat().st_size > 0
