"""EDM (Karras et al. 2022) in the DDPM module: the preconditioning against diffusers' EDM schedulers, the loss
against its weighted-denoiser form, every EDM sampler against the exact denoiser of known data, and the module's
contract (training, sampling, guidance, export, errors)."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import EDMEulerScheduler, UNet2DModel

from atelier.models.ddpm import DDPM
from atelier.nets.unet import build_unet
from atelier.sampling.edm import (
    EDM_SAMPLERS,
    EDMConfig,
    denoiser,
    edm_expected_nfe,
    edm_loss,
    make_edm_scheduler,
    preconditioning,
)

NAMES = sorted(EDM_SAMPLERS)
MU = torch.linspace(-0.4, 0.4, 64).view(1, 8, 8)  # per-pixel data mean
SIGMA_DATA = 0.5


def tiny_edm(num_classes: int | None = None, **kwargs) -> DDPM:
    torch.manual_seed(0)
    net = build_unet(8, 1, block_out_channels=(16, 32), layers_per_block=1, attention_resolutions=(),
                     norm_num_groups=8, num_classes=num_classes)
    kwargs.setdefault("sampler", "edm_dpmpp")
    kwargs.setdefault("parameterization", "edm")
    return DDPM(net, functools.partial(torch.optim.Adam, lr=1e-3), num_classes=num_classes, **kwargs)


class EDMGaussianOracle(torch.nn.Module):
    """The exact EDM network output ``F`` for data ``x0 ~ N(mu, std² I)`` (``std = 0``: the single image ``mu``).

    From the preconditioned input it recovers ``σ = exp(4 c_noise)`` and ``x = input / c_in``; the exact denoiser
    is ``D = mu + std² / (std² + σ²) (x − mu)`` and ``F = (D − c_skip x) / c_out``. Counts its calls.
    """

    def __init__(self, mu: torch.Tensor, std: float) -> None:
        super().__init__()
        self.mu, self.std = mu.double(), std
        self.config = SimpleNamespace(in_channels=mu.shape[0], sample_size=mu.shape[-1])
        self.calls = 0

    def forward(self, model_in: torch.Tensor, c_noise: torch.Tensor) -> SimpleNamespace:
        self.calls += 1
        assert c_noise.dtype.is_floating_point and c_noise.shape == (model_in.shape[0],)
        sigma = (4 * c_noise.double()).exp().view(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = preconditioning(sigma, SIGMA_DATA)
        x = model_in.double() / c_in
        d = self.mu + self.std**2 / (self.std**2 + sigma**2) * (x - self.mu)
        return SimpleNamespace(sample=((d - c_skip * x) / c_out).float())


def oracle_edm(std: float, **kwargs) -> tuple[DDPM, EDMGaussianOracle]:
    model = tiny_edm(**kwargs)
    oracle = EDMGaussianOracle(MU, std)
    model.net = oracle
    model.ema.module = oracle
    return model, oracle


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ the maths
def test_preconditioning_matches_diffusers_edm_scheduler() -> None:
    scheduler = EDMEulerScheduler(**EDMConfig().scheduler_config())
    x, out = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    for value in (0.002, 0.05, 0.5, 3.0, 80.0):
        sigma = torch.tensor(value)
        c_skip, c_out, c_in, c_noise = preconditioning(sigma, SIGMA_DATA)
        torch.testing.assert_close(c_in * x, scheduler.precondition_inputs(x, sigma))
        torch.testing.assert_close(c_noise.view(1), scheduler.precondition_noise(sigma).view(1))
        torch.testing.assert_close(c_skip * x + c_out * out, scheduler.precondition_outputs(x, out, sigma))
    # Table 1's limits: D is the identity at σ → 0 and F carries everything at σ ≫ σ_d
    c_skip, c_out, _, _ = preconditioning(torch.tensor([1e-4, 1e3]), SIGMA_DATA)
    assert c_skip[0] == pytest.approx(1, abs=1e-6) and c_skip[1] < 1e-6 and c_out[1] == pytest.approx(SIGMA_DATA)


def test_loss_is_the_weighted_denoiser_error() -> None:
    """edm_loss (unit-weight MSE on F's effective target) equals λ(σ)‖D(x; σ) − x0‖², λ = (σ² + σ_d²)/(σ σ_d)²."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)

    def predict(x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return net(x) + c_noise.view(-1, 1, 1, 1)

    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    cfg = EDMConfig()
    loss = edm_loss(predict, x0, cfg, g(3))
    # the same draws as edm_loss: ln σ first, then the noise
    gen = g(3)
    sigma = (cfg.p_mean + cfg.p_std * torch.randn(6, generator=gen)).exp()
    noise = torch.randn(x0.shape, generator=gen)
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    d = denoiser(predict, cfg.sigma_data)(x, sigma)
    weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2
    expected = (weight.view(-1, 1, 1, 1) * (d - x0) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert edm_loss(predict, x0, cfg, g(3)) == loss  # the generator fixes σ and noise


def test_edm_config_rejects_bad_sigmas() -> None:
    with pytest.raises(ValueError, match="sigma_min"):
        EDMConfig(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="sigma_data"):
        EDMConfig(sigma_data=0.0)


# ------------------------------------------------------------------------------------------------ the samplers
@pytest.mark.parametrize("name", NAMES)
def test_single_image_data_in_10_steps_with_honest_nfe(name: str) -> None:
    model, oracle = oracle_edm(std=0.0)
    x = model.sample(4, generator=g(0), sampler=name, num_inference_steps=10)
    assert x.shape == (4, 1, 8, 8)
    assert (x - MU).abs().max() < 0.05
    assert oracle.calls == edm_expected_nfe(name, 10) == (19 if name == "edm_heun" else 10)


@pytest.mark.parametrize("name", NAMES)
def test_gaussian_data_mean_and_spread(name: str) -> None:
    """With N(mu, 0.2²) data and 50 steps every sampler recovers the mean and most of the spread."""
    model, _ = oracle_edm(std=0.2)
    x = model.sample(512, generator=g(1), sampler=name, num_inference_steps=50)
    assert (x.mean(0) - MU).abs().mean() < 0.03
    assert 0.18 < float(x.std(0).mean()) < 0.22, float(x.std(0).mean())


def test_heun_churn_is_stochastic_through_the_generator_only() -> None:
    model, _ = oracle_edm(std=0.2, s_churn=10.0)
    a = model.sample(8, generator=g(5), sampler="edm_heun", num_inference_steps=10)
    torch.manual_seed(123)
    b = model.sample(8, generator=g(5), sampler="edm_heun", num_inference_steps=10)
    torch.testing.assert_close(a, b)
    model.hparams.s_churn = 0.0
    c = model.sample(8, generator=g(5), sampler="edm_heun", num_inference_steps=10)
    assert not torch.allclose(a, c)  # churn drew noise that the deterministic Heun did not


def test_sampler_families_do_not_mix() -> None:
    with pytest.raises(ValueError, match="edm_dpmpp"):
        tiny_edm(sampler="dpmpp")
    with pytest.raises(ValueError, match="not an EDM sampler"):
        tiny_edm().sample(2, sampler="dpmpp")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        tiny_edm(min_snr_gamma=5.0)
    with pytest.raises(ValueError, match="parameterization"):
        tiny_edm(parameterization="vp")
    with pytest.raises(ValueError, match="allowed values"):
        make_edm_scheduler("ddim", EDMConfig())


# ------------------------------------------------------------------------------------------------ the module
def test_edm_training_loss_falls_and_samples_keep_the_contract() -> None:
    model = tiny_edm()
    x0 = (torch.rand(16, 1, 8, 8) > 0.5).float() * 2 - 1
    opt = torch.optim.Adam(model.net.parameters(), lr=2e-3)
    losses = []
    for step in range(60):
        loss = model.diffusion_loss(x0, g(step % 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8, losses
    val = model.diffusion_loss(x0, g(0))
    assert torch.isfinite(val) and val == model.diffusion_loss(x0, g(0))
    for name in NAMES:
        a = model.sample(3, generator=g(7), sampler=name, num_inference_steps=4, use_ema=False)
        assert a.shape == (3, 1, 8, 8) and a.dtype == torch.float32 and a.min() >= -1 and a.max() <= 1
        torch.testing.assert_close(a, model.sample(3, generator=g(7), sampler=name, num_inference_steps=4,
                                                   use_ema=False))


def test_conditional_edm_with_guidance() -> None:
    model = tiny_edm(num_classes=3, guidance_scale=2.0)
    x0, y = torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])
    loss = model.diffusion_loss(x0, g(0), labels=y)
    assert torch.isfinite(loss)
    for name in ("edm_dpmpp", "edm_heun"):
        x = model.sample(6, generator=g(1), sampler=name, num_inference_steps=3)
        assert x.shape == (6, 1, 8, 8)
        unguided = model.sample(6, generator=g(1), sampler=name, num_inference_steps=3, guidance_scale=1.0)
        assert not torch.allclose(x, unguided)


def test_save_pretrained_writes_a_unet_and_an_edm_scheduler(tmp_path: Path) -> None:
    model = tiny_edm(sigma_max=40.0)
    out = model.save_pretrained(tmp_path / "export")
    unet = UNet2DModel.from_pretrained(str(out), subfolder="unet")
    scheduler = EDMEulerScheduler.from_pretrained(str(out), subfolder="scheduler")
    assert scheduler.config.sigma_max == 40.0 and scheduler.config.sigma_data == SIGMA_DATA
    x, c_noise = torch.randn(2, 1, 8, 8), torch.full((2,), 0.25 * math.log(2.0))
    with torch.no_grad():
        torch.testing.assert_close(unet(x, c_noise).sample, model.ema.module(x, c_noise).sample)
    assert not (out / "model_index.json").exists()  # no DDPMPipeline: it would not precondition the input


def test_fid_vs_nfe_rows_take_edm_samplers_and_count_heun_nfe() -> None:
    import argparse
    import sys

    from tests.conftest import ROOT, load_script

    sys.path.insert(0, str(ROOT / "scripts"))
    script = load_script("fid_vs_nfe")
    args = argparse.Namespace(rows="edm_dpmpp-25,edm_heun-13,dpmpp-25", samplers=None, nfe=None)
    assert script.parse_rows(args) == [("edm_dpmpp", 25), ("edm_heun", 13), ("dpmpp", 25)]
    assert [script.row_nfe(s, n) for s, n in script.parse_rows(args)] == [25, 25, 25]
    with pytest.raises(SystemExit, match="edm_heun"):
        script.parse_rows(argparse.Namespace(rows="edm_heunn-5", samplers=None, nfe=None))
