"""Every registered sampler: the glue to diffusers (schedules, scaling, generator, NFE) checked against exact
denoisers of known data distributions, and the contract (shape, range, seeds) on a tiny untrained DDPM."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from atelier.models.ddpm import DDPM
from atelier.nets.unet import build_unet
from atelier.sampling.loop import autocast_kwargs, reverse_diffusion
from atelier.sampling.schedulers import (
    SAMPLERS,
    SDEDPMSolver3MScheduler,
    expected_nfe,
    make_scheduler,
    step_kwargs,
)
from atelier.utils.precision import FLAGS_ENV

NAMES = sorted(SAMPLERS)
SCHEDULES = ["linear", "squaredcos_cap_v2"]
PREDICTIONS = ["epsilon", "v_prediction"]
MU = torch.linspace(-0.4, 0.4, 64).view(1, 8, 8)  # per-pixel data mean


def tiny_ddpm(num_classes: int | None = None, **kwargs) -> DDPM:
    torch.manual_seed(0)
    net = build_unet(8, 1, block_out_channels=(16, 32), layers_per_block=1, attention_resolutions=(),
                     norm_num_groups=8, num_classes=num_classes)
    return DDPM(net, functools.partial(torch.optim.Adam, lr=1e-3), num_classes=num_classes, **kwargs)


class GaussianOracle(torch.nn.Module):
    """The exact prediction for data ``x0 ~ N(mu, std² I)`` (``std = 0``: the single image ``mu``).

    ``E[x0 | x_t] = mu + √ᾱ std² (x_t − √ᾱ mu) / (ᾱ std² + 1 − ᾱ)``, ``ε̂ = (x_t − √ᾱ x̂0) / √(1 − ᾱ)`` and
    ``v̂ = √ᾱ ε̂ − √(1 − ᾱ) x̂0``. Counts its calls.
    """

    def __init__(self, mu: torch.Tensor, std: float, alphas_cumprod: torch.Tensor, prediction_type: str) -> None:
        super().__init__()
        self.mu, self.std, self.kind = mu.double(), std, prediction_type
        self.alphas_cumprod = alphas_cumprod.double()
        self.config = SimpleNamespace(in_channels=mu.shape[0], sample_size=mu.shape[-1])
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        self.calls += 1
        assert torch.equal(t, t.round()), f"timesteps must be whole numbers, got {t[:3]}"
        a = self.alphas_cumprod[t.round().long()].view(-1, 1, 1, 1)
        x = x.double()
        x0 = self.mu + a.sqrt() * self.std**2 * (x - a.sqrt() * self.mu) / (a * self.std**2 + 1 - a)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps if self.kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return SimpleNamespace(sample=out.float())


def oracle_ddpm(std: float, beta_schedule: str = "linear", prediction_type: str = "epsilon"
                ) -> tuple[DDPM, GaussianOracle]:
    model = tiny_ddpm(beta_schedule=beta_schedule, prediction_type=prediction_type)
    oracle = GaussianOracle(MU, std, model.noise_scheduler.alphas_cumprod, prediction_type)
    model.net = oracle
    model.ema.module = oracle
    return model, oracle


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("name", NAMES)
def test_every_sampler_builds_on_the_training_schedule(name: str, beta_schedule: str) -> None:
    model = tiny_ddpm(beta_schedule=beta_schedule, prediction_type="v_prediction")
    sched = make_scheduler(name, model.noise_scheduler.config)
    spec = SAMPLERS[name]
    assert isinstance(sched, spec.scheduler)
    assert sched.config.beta_schedule == beta_schedule and sched.config.prediction_type == "v_prediction"
    assert sched.config.num_train_timesteps == 1000
    for key, value in spec.overrides.items():
        assert sched.config[key] == value, key
    assert sched.config.timestep_spacing == "trailing"  # every sampler starts from pure noise at t = T - 1
    assert spec.paper and spec.order >= 1 and spec.nfe_per_step == 1
    sched.set_timesteps(10)
    assert len(sched.timesteps) == 10 and int(sched.timesteps[0]) >= 990


def test_unknown_sampler_lists_the_allowed_names() -> None:
    model = tiny_ddpm()
    with pytest.raises(ValueError, match=r"sampler='euler'.*allowed values.*'dpmpp_sde'.*'unipc'"):
        make_scheduler("euler", model.noise_scheduler.config)
    with pytest.raises(ValueError, match="allowed values"):
        model.sample(2, sampler="nope", num_inference_steps=2)
    with pytest.raises(ValueError, match="allowed values"):
        expected_nfe("nope", 10)


def test_zero_images_or_zero_steps_are_refused() -> None:
    """Before: ``num_inference_steps=0`` silently fell back to the model's default steps, and ``num_samples=0``
    failed deep in the sampler with a torch reduction error."""
    model = tiny_ddpm()
    with pytest.raises(ValueError, match=r"num_inference_steps=0 is not allowed; a sampler needs at least 1 step"):
        model.sample(2, num_inference_steps=0)
    with pytest.raises(ValueError, match=r"n=0: draw at least 1 image"):
        model.sample(0, num_inference_steps=2)
    assert model.sample(1, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).shape == (1, 1, 8, 8)


def test_generator_and_eta_go_only_where_step_takes_them() -> None:
    config = tiny_ddpm().noise_scheduler.config
    gen = g(0)
    assert step_kwargs(make_scheduler("unipc", config), gen, eta=1.0) == {}  # UniPC's step takes no generator
    assert step_kwargs(make_scheduler("ddim", config), gen, eta=0.5) == {"generator": gen, "eta": 0.5}
    for name in ("ddpm", "dpmpp_sde", "dpmpp_3m_sde", "euler_a", "sa_solver"):
        assert step_kwargs(make_scheduler(name, config), gen, eta=0.5) == {"generator": gen}, name


# ------------------------------------------------------------------------------ exact denoisers: accuracy
@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("name", NAMES)
def test_single_image_data_in_10_steps_with_honest_nfe(name: str, beta_schedule: str) -> None:
    """Data = one image: every sampler lands on it in 10 steps, calling the network exactly NFE times."""
    model, oracle = oracle_ddpm(0.0, beta_schedule, "v_prediction")
    out = model.sample(8, generator=g(0), sampler=name, num_inference_steps=10)
    assert oracle.calls == expected_nfe(name, 10) == 10
    assert out.shape == (8, 1, 8, 8) and torch.isfinite(out).all()
    torch.testing.assert_close(out, MU.expand(8, 1, 8, 8), atol=0.05, rtol=0)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("name", NAMES)
def test_gaussian_data_mean_and_spread(name: str, beta_schedule: str, prediction_type: str) -> None:
    """Data ~ N(mu, 0.2²): with enough steps every sampler reproduces the mean and the standard deviation, so the
    stochastic ones add the right amount of noise (a wrong noise scale shows up in the spread)."""
    model, _ = oracle_ddpm(0.2, beta_schedule, prediction_type)
    out = model.sample(512, generator=g(0), sampler=name, num_inference_steps=250, batch_size=512)
    assert torch.isfinite(out).all()
    assert (out.mean(0) - MU).abs().max() < 0.045  # 5 standard errors of a 512-sample mean
    std = float(out.std(0).mean())
    assert 0.18 < std < 0.22, std


def test_third_order_sde_fix_against_stock_diffusers() -> None:
    """diffusers' own 3M-SDE step converges to the wrong spread (the sign error SDEDPMSolver3MScheduler fixes);
    the fixed one reproduces the data. Its ODE branch is diffusers' unchanged."""
    model, oracle = oracle_ddpm(0.2, "squaredcos_cap_v2")
    config, overrides = model.noise_scheduler.config, SAMPLERS["dpmpp_3m_sde"].overrides
    denoise = lambda x, t: oracle(x, t).sample  # noqa: E731
    noise = torch.randn(512, 1, 8, 8, generator=g(0))
    spreads = {}
    for label, cls in (("fixed", SDEDPMSolver3MScheduler), ("stock", DPMSolverMultistepScheduler)):
        x = reverse_diffusion(cls.from_config(config, **overrides), denoise, noise, 200, g(1))
        spreads[label] = float(x.std(0).mean())
    assert abs(spreads["fixed"] - 0.2) < 0.015 and abs(spreads["stock"] - 0.2) > 0.05, spreads
    ode = {**overrides, "algorithm_type": "dpmsolver++"}
    a = reverse_diffusion(SDEDPMSolver3MScheduler.from_config(config, **ode), denoise, noise[:4], 20)
    b = reverse_diffusion(DPMSolverMultistepScheduler.from_config(config, **ode), denoise, noise[:4], 20)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_stochastic_flag_is_honest_and_noise_comes_from_the_generator(name: str) -> None:
    """Same initial noise, different step generators: the images differ exactly for the stochastic samplers; and
    the global RNG never leaks in."""
    model, oracle = oracle_ddpm(0.2)
    noise = torch.randn(16, 1, 8, 8, generator=g(0))

    def run(seed: int, global_seed: int, eta: float = 0.0) -> torch.Tensor:
        torch.manual_seed(global_seed)
        sched = make_scheduler(name, model.noise_scheduler.config)
        return reverse_diffusion(sched, lambda x, t: oracle(x, t).sample, noise, 10, g(seed), eta)

    a, b, c = run(1, 0), run(1, 123), run(2, 0)
    assert torch.equal(a, b)
    assert (not torch.equal(a, c)) == SAMPLERS[name].stochastic
    if name == "ddim":  # eta reaches DDIM's step: eta = 1 draws noise from the generator
        assert not torch.equal(run(1, 0, eta=1.0), run(2, 0, eta=1.0))
        assert torch.equal(run(1, 0, eta=1.0), run(1, 5, eta=1.0))


def test_ddim_eta_is_passed_through_sample() -> None:
    model, _ = oracle_ddpm(0.2)
    det = model.sample(8, generator=g(0), sampler="ddim", num_inference_steps=10)
    sto = model.sample(8, generator=g(0), sampler="ddim", num_inference_steps=10, eta=1.0)
    assert not torch.equal(det, sto)
    assert torch.equal(sto, model.sample(8, generator=g(0), sampler="ddim", num_inference_steps=10, eta=1.0))


def test_strided_ddpm_timesteps() -> None:
    sched = make_scheduler("ddpm", tiny_ddpm().noise_scheduler.config)
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    sched.set_timesteps(1000)
    assert sched.timesteps.tolist() == list(range(999, -1, -1))  # the full chain is unchanged


# ------------------------------------------------------------------------------ tiny untrained UNet: contract
@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("name", NAMES)
def test_tiny_ddpm_contract_shape_range_seed(name: str, beta_schedule: str) -> None:
    model = tiny_ddpm(beta_schedule=beta_schedule, prediction_type="v_prediction")
    calls = []
    model.ema.module.register_forward_hook(lambda *_: calls.append(1))
    a = model.sample(3, generator=g(1), sampler=name, num_inference_steps=10)
    assert len(calls) == expected_nfe(name, 10)
    torch.manual_seed(99)  # the global RNG must not matter
    b = model.sample(3, generator=g(1), sampler=name, num_inference_steps=10)
    c = model.sample(3, generator=g(2), sampler=name, num_inference_steps=10)
    assert a.shape == (3, 1, 8, 8) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", NAMES)
def test_guided_sampling_costs_one_batched_call_per_step(name: str) -> None:
    model = tiny_ddpm(num_classes=3)
    sizes = []
    model.ema.module.register_forward_hook(lambda _m, args, _o: sizes.append(args[0].shape[0]))
    out = model.sample(4, generator=g(0), sampler=name, num_inference_steps=10, guidance_scale=3.0)
    assert sizes == [8] * expected_nfe(name, 10)  # conditional + unconditional as one batch of 2B
    assert torch.isfinite(out).all() and out.shape == (4, 1, 8, 8)


# ------------------------------------------------------------------------------ bf16 autocast option
def test_autocast_option_follows_the_cpu_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_ddpm()
    seen = []
    model.ema.module.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    ref = model.sample(2, generator=g(0), sampler="dpmpp", num_inference_steps=4)
    assert seen == [False] * 4
    monkeypatch.setenv(FLAGS_ENV, "avx2")  # no bf16 matrix units: autocast=True stays fp32
    assert torch.equal(model.sample(2, generator=g(0), sampler="dpmpp", num_inference_steps=4, autocast=True), ref)
    assert seen == [False] * 8
    monkeypatch.setenv(FLAGS_ENV, "avx2,amx_bf16")
    bf16 = model.sample(2, generator=g(0), sampler="dpmpp", num_inference_steps=4, autocast=True)
    assert seen[8:] == [True] * 4
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert (bf16 - ref).abs().max() < 0.1


def test_tasks_resolve_the_autocast_key_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """sample.py / evaluate.py / the scripts pass ``autocast`` as what it resolves to (bf16 only where it pays), and
    only to models whose ``sample`` takes it."""
    model = tiny_ddpm()
    monkeypatch.setenv(FLAGS_ENV, "avx2,avx512_bf16,amx_bf16")
    assert autocast_kwargs(model, True) == {"autocast": True}
    assert autocast_kwargs(model, False) == {"autocast": False}
    assert autocast_kwargs(model, None) == {}
    monkeypatch.setenv(FLAGS_ENV, "avx2,avx512_bf16")  # bf16 vector units only: bf16 would not pay, fp32
    assert autocast_kwargs(model, True) == {"autocast": False}

    class FP32Only:  # a family without the option (GAN, VAE)
        device = torch.device("cpu")

        def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
            return torch.zeros(n, 1, 8, 8)

    assert autocast_kwargs(FP32Only(), True) == {}
