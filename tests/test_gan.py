"""GAN nets and LightningModule: shapes, a few real optimisation steps, EMA, sampling, conditioning."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader, TensorDataset

from atelier.models.gan import GAN
from atelier.nets.gan import DCGANDiscriminator, DCGANGenerator, ResNetDiscriminator, ResNetGenerator


@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("family", ["dcgan", "resnet"])
@pytest.mark.parametrize("num_classes", [None, 3])
def test_nets_are_sized_from_the_image_size(size: int, family: str, num_classes: int | None) -> None:
    g_cls, d_cls = (DCGANGenerator, DCGANDiscriminator) if family == "dcgan" else (ResNetGenerator,
                                                                                  ResNetDiscriminator)
    norm = "spectral" if family == "resnet" else "batch"
    g = g_cls(image_size=size, channels=3, z_dim=8, base_channels=8, num_classes=num_classes)
    d = d_cls(image_size=size, channels=3, base_channels=8, norm=norm, num_classes=num_classes)
    labels = None if num_classes is None else torch.tensor([0, 2])
    x = g(torch.randn(2, 8), labels)
    assert x.shape == (2, 3, size, size)
    assert x.min() >= -1 and x.max() <= 1
    assert d(x, labels).shape == (2,)


def test_bad_sizes_and_norms_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"data\.image_size=28"):
        DCGANGenerator(image_size=28)
    with pytest.raises(ValueError, match=r"model\.discriminator\.norm='layer'"):
        DCGANDiscriminator(norm="layer")
    with pytest.raises(ValueError, match="num_classes"):
        _gan(num_classes_d=5)


def test_projection_discriminator_uses_the_label() -> None:
    torch.manual_seed(0)
    d = DCGANDiscriminator(image_size=16, channels=1, base_channels=8, norm="none", num_classes=4)
    x = torch.randn(3, 1, 16, 16)
    assert not torch.allclose(d(x, torch.tensor([0, 0, 0])), d(x, torch.tensor([1, 1, 1])))
    with pytest.raises(ValueError, match="class-conditional"):
        d(x)


def _gan(num_classes: int | None = None, num_classes_d: int | None = None, **kwargs) -> GAN:
    g = DCGANGenerator(image_size=16, channels=1, z_dim=8, base_channels=8, num_classes=num_classes)
    d_norm = kwargs.pop("d_norm", "batch")
    d = DCGANDiscriminator(image_size=16, channels=1, base_channels=8, norm=d_norm,
                           num_classes=num_classes if num_classes_d is None else num_classes_d)
    opt = partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.999))
    return GAN(g, d, opt, opt, ema_decay=0.9, interpolation_rows=2, interpolation_steps=3, **kwargs)


def _fit(model: GAN, batches: int, labels: bool = False, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    torch.manual_seed(0)
    x = torch.rand(batches * 8, 1, 16, 16) * 2 - 1
    y = torch.randint(0, 3, (batches * 8,))
    data = TensorDataset(x, y) if labels else TensorDataset(x)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(model, DataLoader(data, batch_size=8))
    return trainer


def _copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_few_steps_change_g_and_d_and_the_ema_lags() -> None:
    model = _gan()
    g0, d0 = _copy(model.generator), _copy(model.discriminator)
    trainer = _fit(model, batches=4)
    assert trainer.global_step == 8  # one D and one G optimiser step per batch
    assert int(model.d_steps) == 4
    for name, before in (("generator", g0), ("discriminator", d0)):
        after = getattr(model, name).state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point()), name
    ema = model.ema.module.state_dict()
    g = model.generator.state_dict()
    assert not torch.allclose(ema["main.0.weight"], g["main.0.weight"])
    assert not torch.allclose(ema["main.0.weight"], g0["main.0.weight"])  # it moved too
    metrics = trainer.callback_metrics
    for key in ("train/d_loss", "train/g_loss", "train/d_real", "train/d_fake"):
        assert torch.isfinite(metrics[key]), key


class _LRs(L.Callback):
    """``(global_step, lr of G, lr of D)`` after every batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        opt_g, opt_d = pl_module.optimizers()
        self.seen.append((trainer.global_step, opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]))


@pytest.mark.parametrize(("n_critic", "batches", "total"), [(1, 6, 12), (2, 8, 12)])
def test_lr_schedule_follows_the_global_step_and_ends_at_zero(n_critic: int, batches: int, total: int) -> None:
    cosine = partial(get_scheduler, name="cosine", num_warmup_steps=0)
    model = _gan(lr_scheduler=cosine, n_critic=n_critic, **({"loss": "wgan_gp", "d_norm": "none"}
                                                             if n_critic > 1 else {}))
    lrs = _LRs()
    trainer = _fit(model, batches=batches, callbacks=[lrs])
    assert trainer.global_step == total  # batches x (1 + 1/n_critic) optimiser steps: the schedule's length
    for step, lr_g, lr_d in lrs.seen:  # both LRs: the cosine (peak 1e-3) at the global step, on one clock
        expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / total))
        assert lr_g == pytest.approx(expected, abs=1e-12) and lr_d == pytest.approx(expected, abs=1e-12)
    assert lrs.seen[-1][1:] == (pytest.approx(0.0, abs=1e-12),) * 2
    assert len(trainer.lr_scheduler_configs) == 2


def test_without_a_schedule_the_lrs_stay_constant() -> None:
    lrs = _LRs()
    _fit(_gan(), batches=3, callbacks=[lrs])
    assert {lr for _, *pair in lrs.seen for lr in pair} == {1e-3}


def test_n_critic_wgan_gp_and_r1_are_applied() -> None:
    model = _gan(loss="wgan_gp", n_critic=2, d_norm="none", r1_gamma=1.0, r1_interval=2)
    trainer = _fit(model, batches=4)
    assert int(model.d_steps) == 4
    assert trainer.global_step == 4 + 2  # 4 critic steps, 2 generator steps
    assert trainer.callback_metrics["train/gp"] >= 0
    assert trainer.callback_metrics["train/r1"] > 0


def test_sample_contract_and_conditional_labels() -> None:
    model = _gan(num_classes=3, diffaugment="color,translation,cutout")
    _fit(model, batches=2, labels=True)
    a = model.sample(5, generator=torch.Generator().manual_seed(1))
    b = model.sample(5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (5, 1, 16, 16) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    raw = model.sample(5, generator=torch.Generator().manual_seed(1), use_ema=False)
    assert not torch.allclose(a, raw)
    same_z_other_class = model.sample(5, generator=torch.Generator().manual_seed(1), labels=torch.zeros(5))
    # default labels put one class per grid row: [0, 0, 1, 1, 2]
    assert torch.equal(a[:2], same_z_other_class[:2]) and not torch.allclose(a[2], same_z_other_class[2])
    grids = model.visualizations(torch.Generator().manual_seed(0))
    images, nrow = grids["interpolation"]
    assert images.shape == (6, 1, 16, 16) and nrow == 3
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\); got \[0, 3\]"):
        model.sample(2, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="got 1 labels for 2 samples"):
        model.sample(2, labels=torch.tensor([0]))


def test_conditional_gan_needs_labels() -> None:
    model = _gan(num_classes=3)
    with pytest.raises(Exception, match="label"):
        _fit(model, batches=1, labels=False)


def test_nearest_upsampling_generator_has_no_transposed_stage_but_the_first() -> None:
    g = DCGANGenerator(image_size=64, channels=3, z_dim=8, base_channels=8, upsample="nearest")
    kinds = [type(m).__name__ for m in g.main]
    assert kinds.count("ConvTranspose2d") == 1  # z (1×1) → 4×4
    assert kinds.count("Upsample") == 4 and kinds.count("Conv2d") == 4
    x = g(torch.randn(2, 8))
    assert x.shape == (2, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match=r"model\.generator\.upsample='bilinear' is not allowed"):
        DCGANGenerator(upsample="bilinear")


def test_periodic_grids_fire_on_multiples_the_n_critic_step_jumps_over(tmp_path: Path) -> None:
    from atelier.callbacks.samples import SampleGrid

    # n_critic = 2: the global step goes 1, 3, 4, 6, 7, 9, 10, 12 (a D-only batch adds 1, a D + G batch adds 2),
    # so a `step % 5 == 0` test would fire at 10 only; every multiple of 5 crossed must give one grid
    model = _gan(n_critic=2, loss="wgan_gp", d_norm="none")
    grid = SampleGrid(str(tmp_path / "samples"), every_n_steps=5, num_samples=4, on_train_end=False)
    trainer = _fit(model, batches=8, callbacks=[grid])
    assert trainer.global_step == 12
    names = sorted(p.name for p in (tmp_path / "samples").glob("step_*.png"))
    assert names == ["step_0000006.png", "step_0000010.png"], names


def test_every_n_steps_fires_once_per_multiple_reached_or_passed() -> None:
    from atelier.callbacks.every_n import EveryNSteps

    every = EveryNSteps(5)
    fired = [s for s in (1, 3, 4, 6, 7, 9, 10, 10, 12, 14, 15, 16) if every.fire(s)]
    assert fired == [6, 10, 15]  # 10 seen twice (gradient accumulation) fires once
    resumed = EveryNSteps(5)
    assert not resumed.fire(11) and resumed.fire(15)  # resumed at 10: the first call does not look back further
    assert not any(EveryNSteps(0).fire(s) for s in range(1, 20))


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.d: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.d.append(float(trainer.callback_metrics["train/d_loss"]))


def test_channels_last_trains_like_the_default_layout_and_checkpoints_load_in_either(tmp_path: Path) -> None:
    runs = {}
    for channels_last in (False, True):
        torch.manual_seed(1)
        model = _gan(num_classes=3, d_norm="spectral", channels_last=channels_last,
                     diffaugment="color,translation,cutout")
        losses = _Losses()
        trainer = _fit(model, batches=4, labels=True, callbacks=[losses])
        runs[channels_last] = (model, losses.d)
        conv = model.discriminator.main[2].parametrizations.weight.original  # (16, 8, 4, 4); the first has C_in = 1
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert model.ema.module.main[3].weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        trainer.save_checkpoint(tmp_path / f"cl_{channels_last}.ckpt")
    (default, d_default), (cl, d_cl) = runs[False], runs[True]
    # the same arithmetic in another memory layout: the same losses and weights up to float reordering
    assert d_cl == pytest.approx(d_default, rel=1e-4, abs=1e-5)
    for (name, a), b in zip(default.generator.state_dict().items(), cl.generator.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), name
    # a channels-last checkpoint loads into a default-layout model and samples the same images
    state = torch.load(tmp_path / "cl_True.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    fresh = _gan(num_classes=3, d_norm="spectral")
    fresh.load_state_dict(state)
    a = fresh.sample(6, generator=torch.Generator().manual_seed(0))
    b = cl.sample(6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, b, atol=1e-5)
