"""DDPM module: loss weighting, EMA, overfitting one batch, samplers, diffusers pipeline export."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMPipeline

from atelier.models.ddpm import DDPM, min_snr_weight
from atelier.models.ema import ema_decay_at, make_ema
from atelier.nets.unet import build_unet
from atelier.sampling.schedulers import make_scheduler


def tiny_ddpm(**kwargs) -> DDPM:
    torch.manual_seed(0)
    net = build_unet(8, 1, block_out_channels=(16, 32), layers_per_block=1, attention_resolutions=(),
                     norm_num_groups=8)
    opt = functools.partial(torch.optim.Adam, lr=kwargs.pop("lr", 2e-3))
    return DDPM(net, opt, **kwargs)


def test_min_snr_weight_hand_values() -> None:
    snr = torch.tensor([0.5, 5.0, 20.0])
    assert torch.allclose(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    assert torch.allclose(min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))
    assert torch.allclose(min_snr_weight(snr, 5.0, "sample"), torch.tensor([0.5, 5.0, 5.0]))


def test_ema_warmup_and_update() -> None:
    assert ema_decay_at(0, 0.999, True) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999, True) == pytest.approx(91 / 100)
    assert ema_decay_at(10**6, 0.999, True) == 0.999
    assert ema_decay_at(3, 0.99, False) == 0.99
    net = torch.nn.Linear(2, 1, bias=False)
    ema = make_ema(net, 0.9, warmup=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema.update_parameters(net)  # first update copies
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update_parameters(net)  # 0.9 * 0 + 0.1 * 1
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.1))
    with pytest.raises(ValueError, match="ema_decay"):
        make_ema(net, 1.0)


@pytest.mark.parametrize(("key", "value"), [("beta_schedule", "cosine"), ("prediction_type", "eps"),
                                            ("sampler", "euler")])
def test_bad_values_name_the_key_and_choices(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"model\.{key}='{value}'.*choose one of"):
        tiny_ddpm(**{key: value})


def test_unet_size_errors() -> None:
    with pytest.raises(ValueError, match="image_size=30"):
        build_unet(30, block_out_channels=(32, 64, 64))
    with pytest.raises(ValueError, match="attention_resolutions"):
        build_unet(32, block_out_channels=(32, 64), attention_resolutions=(4,))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_falls_when_overfitting_one_batch(prediction_type: str) -> None:
    model = tiny_ddpm(prediction_type=prediction_type, min_snr_gamma=5.0)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    opt = torch.optim.Adam(model.net.parameters(), lr=3e-3)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(torch.stack([model.diffusion_loss(x0, torch.Generator().manual_seed(s))
                                      for s in range(8)]).mean())

    before = eval_loss()
    for _ in range(150):
        loss = model.diffusion_loss(x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.6 * before, (before, after)


@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 5), ("ddpm", 4), ("dpmpp", 5)])
def test_sample_shape_range_and_seed(sampler: str, steps: int) -> None:
    model = tiny_ddpm()
    a = model.sample(3, generator=torch.Generator().manual_seed(1), sampler=sampler, num_inference_steps=steps)
    b = model.sample(3, generator=torch.Generator().manual_seed(1), sampler=sampler, num_inference_steps=steps)
    c = model.sample(3, generator=torch.Generator().manual_seed(2), sampler=sampler, num_inference_steps=steps)
    assert a.shape == (3, 1, 8, 8) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_batches_and_uses_ema() -> None:
    model = tiny_ddpm()
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn_like(p))  # raw weights now differ from the EMA copy
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    chunked = model.sample(5, generator=g(), num_inference_steps=3, batch_size=2)
    assert chunked.shape == (5, 1, 8, 8)
    ema = model.sample(2, generator=g(), num_inference_steps=3)
    raw = model.sample(2, generator=g(), num_inference_steps=3, use_ema=False)
    assert not torch.allclose(ema, raw)


def test_ddim_scheduler_keeps_training_schedule() -> None:
    model = tiny_ddpm(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    sched = make_scheduler("ddim", model.noise_scheduler.config)
    assert sched.config.beta_schedule == "squaredcos_cap_v2"
    assert sched.config.prediction_type == "v_prediction"
    # the sampler's own settings win over the training scheduler's defaults
    assert sched.config.timestep_spacing == "trailing"
    dpm = make_scheduler("dpmpp", model.noise_scheduler.config)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.thresholding is True
    with pytest.raises(ValueError, match="allowed values"):
        make_scheduler("nope", model.noise_scheduler.config)


def test_save_pretrained_loads_as_ddpm_pipeline(tmp_path: Path) -> None:
    model = tiny_ddpm()
    model.save_pretrained(tmp_path / "pipe")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    for name, p in pipe.unet.state_dict().items():
        assert torch.equal(p, model.ema.module.state_dict()[name])
    out = pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 8, 8, 1)


class OracleEpsilon(torch.nn.Module):
    """The exact ε-prediction for data that is a single image ``x_star``: ε = (x_t - √ᾱ_t x*) / √(1 - ᾱ_t)."""

    def __init__(self, x_star: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("x_star", x_star)
        self.register_buffer("alphas_cumprod", alphas_cumprod.double())
        self.config = SimpleNamespace(in_channels=x_star.shape[0], sample_size=x_star.shape[-1])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        a = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1) if t.ndim else self.alphas_cumprod[t.long()]
        eps = (x.double() - a.sqrt() * self.x_star) / (1 - a).sqrt()
        return SimpleNamespace(sample=eps.float())


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 1000), ("ddim", 20), ("dpmpp", 10)])
def test_samplers_reach_the_data_with_an_exact_denoiser(beta_schedule: str, sampler: str, steps: int) -> None:
    """With the exact ε of a one-image data set, every sampler must land on that image (checks the glue:
    timesteps, schedules, scaling) for both beta schedules."""
    x_star = torch.linspace(-0.9, 0.9, 64).view(1, 8, 8)
    model = tiny_ddpm(beta_schedule=beta_schedule)
    oracle = OracleEpsilon(x_star, model.noise_scheduler.alphas_cumprod)
    model.net = oracle
    model.ema.module = oracle
    out = model.sample(4, generator=torch.Generator().manual_seed(0), sampler=sampler, num_inference_steps=steps)
    assert out.shape == (4, 1, 8, 8)
    torch.testing.assert_close(out, x_star.expand(4, 1, 8, 8), atol=0.05, rtol=0)
