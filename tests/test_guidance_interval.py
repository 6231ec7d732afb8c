"""Guidance limited to an interval of noise levels (Kynkäänniemi et al. 2024): the σ of each step, which steps
are guided (the guide is called exactly there), the limits (every step = plain guidance, no step = unguided),
classifier-free guidance, EDM's σ, the errors, and the tasks' key."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from atelier.models.ddpm_sampling import check_interval, guided_steps, noise_sigma
from atelier.sampling.edm import preconditioning
from atelier.sampling.guidance import in_interval
from atelier.tasks.sample import sample_kwargs
from tests.test_ddpm import tiny_ddpm
from tests.test_ddpm_conditional import tiny_cond_ddpm
from tests.test_edm import tiny_edm


class Counting(nn.Module):
    """Wraps a UNet; records the noise level σ of every call."""

    def __init__(self, inner: nn.Module, model: object) -> None:
        super().__init__()
        self.inner, self.model, self.sigmas = inner, model, []
        self.config = inner.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kw: object) -> object:
        self.sigmas.append(noise_sigma(self.model, t))
        return self.inner(x, t, **kw)


def _worse(net: nn.Module) -> nn.Module:
    guide = copy.deepcopy(net)
    with torch.no_grad():
        for p in guide.parameters():
            p.mul_(0.5)
    return guide


def test_sigma_of_a_step_and_the_interval_bounds() -> None:
    model = tiny_ddpm(beta_schedule="squaredcos_cap_v2")
    abar = model.noise_scheduler.alphas_cumprod
    for t in (0, 250, 999):
        assert noise_sigma(model, torch.tensor([t, t])) == pytest.approx(float(((1 - abar[t]) / abar[t]).sqrt()),
                                                                          rel=1e-5)
    assert noise_sigma(model, torch.tensor([499.6])) == pytest.approx(noise_sigma(model, torch.tensor([500])))
    edm = tiny_edm()
    c_noise = preconditioning(torch.tensor([2.0]), edm.edm.sigma_data)[3]
    assert noise_sigma(edm, c_noise) == pytest.approx(2.0, rel=1e-5)
    assert in_interval(1.0, (0.5, 1.0)) and not in_interval(0.5, (0.5, 1.0))  # (lo, hi]
    assert check_interval([0.28, 5.42]) == (0.28, 5.42)
    for bad in ([1.0], [2.0, 1.0], [-1.0, 1.0]):
        with pytest.raises(ValueError, match="guidance_interval="):
            check_interval(bad)


@pytest.mark.parametrize("sampler", ["dpmpp_sde", "ddim"])
def test_the_guide_runs_only_inside_the_interval(sampler: str) -> None:
    model = tiny_ddpm(prediction_type="v_prediction")
    guide = Counting(_worse(model.ema.module), model)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    kw = {"sampler": sampler, "num_inference_steps": 6, "guide": guide, "autoguidance_scale": 2.0}
    everywhere = model.sample(2, generator=g(), **kw)
    all_sigmas = list(guide.sigmas)
    assert len(all_sigmas) == 6
    guide.sigmas.clear()
    assert torch.equal(model.sample(2, generator=g(), guidance_interval=(0.0, float("inf")), **kw), everywhere)
    guide.sigmas.clear()
    unguided = model.sample(2, generator=g(), sampler=sampler, num_inference_steps=6)
    nowhere = model.sample(2, generator=g(), guidance_interval=(1e9, 2e9), **kw)
    assert guide.sigmas == [] and torch.allclose(nowhere, unguided, atol=1e-6)  # the guide never ran
    # an interval around the middle steps: the guide runs exactly at the steps whose σ lies inside
    ordered = sorted(all_sigmas)
    interval = (ordered[1], ordered[4])  # (lo, hi]: the 2nd..4th smallest σ → 3 guided steps
    part = model.sample(2, generator=g(), guidance_interval=interval, **kw)
    assert sorted(guide.sigmas) == pytest.approx(ordered[2:5])
    assert guided_steps(model, sampler, 6, interval) == 3 and guided_steps(model, sampler, 6, None) == 6
    assert not torch.allclose(part, everywhere) and not torch.allclose(part, unguided)
    assert part.shape == (2, 1, 8, 8) and part.min() >= -1 and part.max() <= 1


def test_classifier_free_guidance_outside_the_interval_is_the_conditional_model() -> None:
    model = tiny_cond_ddpm(num_classes=3)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    kw = {"num_inference_steps": 4, "labels": torch.tensor([0, 2])}
    conditional = model.sample(2, generator=g(), guidance_scale=1.0, **kw)
    nowhere = model.sample(2, generator=g(), guidance_scale=3.0, guidance_interval=(1e9, 2e9), **kw)
    guided = model.sample(2, generator=g(), guidance_scale=3.0, **kw)
    assert torch.allclose(nowhere, conditional, atol=1e-6) and not torch.allclose(guided, conditional)
    with pytest.raises(ValueError, match=r"guidance_interval=\[3\.0, 1\.0\]"):
        model.sample(2, generator=g(), guidance_interval=(3.0, 1.0), **kw)


def test_edm_steps_are_guided_by_their_sigma() -> None:
    model = tiny_edm(sampler="edm_dpmpp")
    guide = Counting(_worse(model.ema.module), model)
    model.sample(1, generator=torch.Generator().manual_seed(0), num_inference_steps=5, guide=guide,
                 autoguidance_scale=2.0, guidance_interval=(0.5, 5.0))
    assert guide.sigmas and all(0.5 < s <= 5.0 for s in guide.sigmas)
    assert len(guide.sigmas) == guided_steps(model, "edm_dpmpp", 5, (0.5, 5.0))


def test_the_tasks_pass_the_key_as_floats() -> None:
    model = tiny_ddpm()
    cfg = OmegaConf.create({"sampler": None, "num_inference_steps": 3, "batch_size": 8, "guidance_scale": None,
                            "sampling_prior": None, "class_labels": None, "class_label": None, "num_samples": 2,
                            "guide_ckpt_path": None, "autoguidance_scale": None, "guidance_interval": [0.28, 5]})
    kwargs = sample_kwargs(model, cfg)
    assert kwargs["guidance_interval"] == [0.28, 5.0] and all(isinstance(v, float) for v in kwargs["guidance_interval"])
    cfg.guidance_interval = 0.5
    with pytest.raises(ValueError, match=r"guidance_interval=0\.5 must be a list"):
        sample_kwargs(model, cfg)
