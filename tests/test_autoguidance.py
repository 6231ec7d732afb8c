"""Autoguidance (Karras et al. 2024): the extrapolation, its wiring into DDPM.sample, the tasks' guide_ckpt_path
and the sweep script."""

from __future__ import annotations

import copy
import csv
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from atelier.sampling.guidance import autoguided_prediction
from atelier.tasks import evaluate, sample, train
from tests.conftest import ROOT, compose_cfg
from tests.test_ddpm import tiny_ddpm
from tests.test_evaluate import TINY_RUN, classifier_ckpt, eval_cfg  # noqa: F401  (classifier_ckpt: a fixture)


class Constant(nn.Module):
    """A 'network' predicting a constant image; counts its calls."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value, self.calls = value, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.full_like(x, self.value)


class Extrapolated(nn.Module):
    """``guide + w · (main − guide)`` as one UNet-like network (``.sample`` output, ``.config`` of ``main``)."""

    def __init__(self, main: nn.Module, guide: nn.Module, w: float) -> None:
        super().__init__()
        self.main, self.guide, self.w = main, guide, w
        self.config = main.config

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        g = self.guide(x, t).sample
        return SimpleNamespace(sample=g + self.w * (self.main(x, t).sample - g))


def test_autoguided_prediction_extrapolates_away_from_the_guide() -> None:
    main, guide = Constant(1.0), Constant(0.25)
    x, t = torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    predict = lambda net, x_, t_: net(x_, t_)  # noqa: E731
    out = autoguided_prediction(predict, main, guide, x, t, 3.0)
    assert torch.allclose(out, torch.full_like(x, 0.25 + 3.0 * 0.75))
    calls = guide.calls
    assert torch.equal(autoguided_prediction(predict, main, guide, x, t, 1.0), torch.ones_like(x))
    assert guide.calls == calls  # w = 1: the guide is not evaluated


@pytest.mark.parametrize("sampler", ["dpmpp_sde", "ddim"])
def test_sample_with_a_guide_runs_the_extrapolated_prediction(sampler: str) -> None:
    model = tiny_ddpm(prediction_type="v_prediction")
    guide = copy.deepcopy(model.ema.module)
    with torch.no_grad():
        for p in guide.parameters():
            p.mul_(0.5)  # a different ("worse") network
    guide.train()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    kw = {"sampler": sampler, "num_inference_steps": 4}
    plain = model.sample(3, generator=g(), **kw)
    guided = model.sample(3, generator=g(), guide=guide, autoguidance_scale=2.0, **kw)
    assert guided.shape == (3, 1, 8, 8) and guided.min() >= -1 and guided.max() <= 1
    assert not torch.allclose(plain, guided)
    assert guide.training  # its mode is restored
    # the same images as a network that computes guide + w (main - guide) itself
    model.ema.module = Extrapolated(model.ema.module, guide.eval(), 2.0)
    reference = model.sample(3, generator=g(), **kw)
    assert torch.allclose(guided, reference, atol=1e-5)


def test_a_guide_equal_to_the_model_changes_nothing_and_a_scale_needs_a_guide() -> None:
    model = tiny_ddpm()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    same = copy.deepcopy(model.ema.module)
    plain = model.sample(2, generator=g(), num_inference_steps=3)
    guided = model.sample(2, generator=g(), num_inference_steps=3, guide=same, autoguidance_scale=2.5)
    assert torch.allclose(plain, guided, atol=1e-6)
    with pytest.raises(ValueError, match=r"autoguidance_scale=2\.0 needs a guide"):
        model.sample(2, generator=g(), num_inference_steps=3, autoguidance_scale=2.0)


def _cfg(**values: object) -> DictConfig:
    return OmegaConf.create({"guide_ckpt_path": None, "autoguidance_scale": None, **values})


def test_tasks_load_the_guide_record_it_and_reject_another_model(
        train_cfg: Callable[..., DictConfig], tmp_path: Path, classifier_ckpt: Path) -> None:  # noqa: F811
    train.run(train_cfg(*TINY_RUN, "callbacks.sample_grid=null"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    model = sample.load_module(ckpt)
    kwargs = sample.guide_kwargs(model, _cfg(guide_ckpt_path=str(ckpt)))
    assert kwargs["autoguidance_scale"] == 2.0 and isinstance(kwargs["guide"], nn.Module)
    assert kwargs["guide"] is not model.ema.module
    assert sample.guide_kwargs(model, _cfg()) == {}
    with pytest.raises(ValueError, match="autoguidance_scale=3 needs guide_ckpt_path"):
        sample.guide_kwargs(model, _cfg(autoguidance_scale=3))
    no_guide = SimpleNamespace(sample=lambda n, generator=None: torch.zeros(n, 1, 8, 8))  # e.g. a GAN's sample()
    with pytest.raises(ValueError, match="takes no guide network"):
        sample.guide_kwargs(no_guide, _cfg(guide_ckpt_path=str(ckpt)))

    result = evaluate.run(eval_cfg(ckpt, tmp_path, classifier_ckpt, "num_inference_steps=2", "metrics=[fid]",
                                   f"guide_ckpt_path={ckpt}", "autoguidance_scale=1.5"))
    sampling = result["protocol"]["sampling"]
    assert sampling["guide"] == str(ckpt) and sampling["autoguidance_scale"] == 1.5
    assert math.isfinite(result["metrics"]["fid"])
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["protocol"]["sampling"]["guide"] == str(ckpt)

    # a narrower / wider network is a valid guide (the paper's guide is smaller); another parameterization is not
    other = tmp_path / "wider"
    wider = train_cfg(*TINY_RUN, "callbacks.sample_grid=null", "model.net.block_out_channels=[32,32]")
    wider.paths.output_dir = str(other)
    train.run(wider)
    kwargs = sample.guide_kwargs(model, _cfg(guide_ckpt_path=str(other / "checkpoints" / "last.ckpt")))
    assert sum(p.numel() for p in kwargs["guide"].parameters()) > sum(p.numel() for p in model.ema.module.parameters())
    x = model.sample(3, generator=torch.Generator().manual_seed(0), num_inference_steps=2, **kwargs)
    assert x.shape == (3, *model.image_shape) and float(x.min()) >= -1 and float(x.max()) <= 1
    v_pred = tmp_path / "vpred"
    other_cfg = train_cfg(*TINY_RUN, "callbacks.sample_grid=null", "model.prediction_type=v_prediction")
    other_cfg.paths.output_dir = str(v_pred)
    train.run(other_cfg)
    with pytest.raises(ValueError, match=r"guide_ckpt_path=.*vpred.* different model.*prediction_type 'v_prediction'"):
        sample.guide_kwargs(model, _cfg(guide_ckpt_path=str(v_pred / "checkpoints" / "last.ckpt")))


def test_autoguidance_sweep_script_writes_table_csv_and_plot(
        train_cfg: Callable[..., DictConfig], tmp_path: Path, classifier_ckpt: Path) -> None:  # noqa: F811
    train.run(train_cfg(*TINY_RUN, "callbacks.sample_grid=null"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "scripts" / "autoguidance_sweep.py"), str(ckpt), "--guides", str(ckpt),
           "--scales", "1,2", "--intervals", "none,1e9:2e9", "--steps", "2", "--num-samples", "20",
           "--batch-size", "10", "--reference-size", "40",
           "--metrics", "fid", "--classifier-ckpt", str(classifier_ckpt), "--cache-dir", str(tmp_path / "cache"),
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader((out / "autoguidance_sweep.csv").read_text().splitlines()))
    assert [(r["guide"], r["autoguidance_scale"], r["NFE"]) for r in rows] == [
        ("", "1.0", "2"), (str(ckpt), "2.0", "4"), (str(ckpt), "2.0", "2")]  # the last: no step in its interval
    # the guide is the model itself here, so w = 2 gives the unguided images again (D + 2 (D - D) = D)
    assert float(rows[1]["fid"]) == pytest.approx(float(rows[0]["fid"]), rel=1e-3)
    assert float(rows[2]["fid"]) == pytest.approx(float(rows[0]["fid"]), rel=1e-3)
    record = json.loads((out / "autoguidance_sweep.json").read_text())
    assert [r["guidance_interval"] for r in record["rows"]] == [None, None, [1e9, 2e9]]
    assert record["protocol"]["num_samples"] == 20 and (out / "autoguidance_sweep.png").stat().st_size > 1000


def test_the_recipe_picks_its_own_guide_by_fraction_of_the_run(
        train_cfg: Callable[..., DictConfig], tmp_path: Path, classifier_ckpt: Path) -> None:  # noqa: F811
    train.run(train_cfg("trainer.max_steps=4", "trainer.limit_val_batches=1", "export_pipeline=false",
                        "callbacks.sample_grid=null", "callbacks.model_checkpoint.every_n_train_steps=1",
                        "sampling={autoguidance:{guide_fraction:0.5,scale:1.5}}"))
    folder = tmp_path / "checkpoints"
    last = folder / "last.ckpt"
    assert sample.recipe_guide(last) == (str(folder / "step_0000002.ckpt"), 1.5)  # 0.5 x global step 4
    assert sample.guide_choice(_cfg(ckpt_path=str(last))) == (str(folder / "step_0000002.ckpt"), 1.5)
    assert sample.guide_choice(_cfg(ckpt_path=str(last), autoguidance_scale=3)) == (
        str(folder / "step_0000002.ckpt"), 3.0)
    assert sample.guide_choice(_cfg(ckpt_path=str(last), autoguidance_scale=1)) == (None, None)
    # never a later checkpoint, nor the sampled one itself: from step 2 (target 1) only step 1 qualifies
    assert sample.recipe_guide(folder / "step_0000002.ckpt") == (str(folder / "step_0000001.ckpt"), 1.5)
    explicit = str(folder / "step_0000001.ckpt")
    assert sample.guide_choice(_cfg(ckpt_path=str(last), guide_ckpt_path=explicit)) == (explicit, 2.0)

    result = evaluate.run(eval_cfg(last, tmp_path, classifier_ckpt, "num_inference_steps=2", "metrics=[fid]"))
    sampling = result["protocol"]["sampling"]
    assert sampling["guide"] == str(folder / "step_0000002.ckpt") and sampling["autoguidance_scale"] == 1.5

    for step in folder.glob("step_*.ckpt"):
        step.unlink()
    with pytest.raises(FileNotFoundError, match=r"no step_\*\.ckpt earlier than its step 4 lies in .*scale=1"):
        sample.guide_choice(_cfg(ckpt_path=str(last)))


def test_a_run_without_the_recipe_key_samples_unguided_and_the_quick_recipe_has_it(
        train_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    train.run(train_cfg(*TINY_RUN, "callbacks.sample_grid=null"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert sample.recipe_guide(last) is None
    assert sample.guide_choice(_cfg(ckpt_path=str(last))) == (None, None)
    with pytest.raises(ValueError, match="autoguidance_scale=2 needs guide_ckpt_path"):
        sample.guide_choice(_cfg(ckpt_path=str(last), autoguidance_scale=2))
    quick = compose_cfg("train", ["experiment=ddpm_mnist_cpu"])
    assert quick.sampling.autoguidance.guide_fraction == pytest.approx(0.18)
    for derived in ("ddpm_cond_mnist_cpu", "ddpm_edm_mnist_cpu"):  # not measured there: no default guide
        assert compose_cfg("train", [f"experiment={derived}"]).sampling is None
