"""Adversarial losses, penalties and ELBO terms against hand-computed values and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from atelier.losses.gan import discriminator_loss, generator_loss, gradient_penalty, r1_penalty
from atelier.losses.vae import gaussian_kl, kl_weight, reconstruction_nll


def test_hinge_loss_hand_checked() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; fake: relu(1-2)=0, relu(1+0.5)=1.5 -> 0.75
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(1.0)
    assert generator_loss("hinge", fake).item() == pytest.approx(0.75)


def test_non_saturating_loss_hand_checked() -> None:
    zeros = torch.zeros(3)
    assert discriminator_loss("non_saturating", zeros, zeros).item() == pytest.approx(2 * math.log(2))
    # D(real)=log 3 -> -log sigmoid = log(4/3); D(fake)=-log 3 -> -log(1-sigmoid) = log(4/3)
    real, fake = torch.full((2,), math.log(3)), torch.full((2,), -math.log(3))
    assert discriminator_loss("non_saturating", real, fake).item() == pytest.approx(2 * math.log(4 / 3))
    assert generator_loss("non_saturating", fake).item() == pytest.approx(math.log(4))
    # matches binary cross-entropy on probabilities
    bce = torch.nn.functional.binary_cross_entropy(torch.sigmoid(fake), torch.ones(2))
    assert generator_loss("non_saturating", fake).item() == pytest.approx(bce.item(), rel=1e-6)


def test_wasserstein_critic_loss() -> None:
    real, fake = torch.tensor([[3.0], [1.0]]), torch.tensor([[0.5], [-0.5]])
    assert discriminator_loss("wgan_gp", real, fake).item() == pytest.approx(0.0 - 2.0)
    assert generator_loss("wgan_gp", fake).item() == pytest.approx(0.0)


def test_unknown_loss_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"model\.loss='lsgan'.*hinge"):
        discriminator_loss("lsgan", torch.zeros(1), torch.zeros(1))


def _linear_critic(w: torch.Tensor):
    return lambda x: (x.flatten(1) * w.flatten()).sum(1)


def test_gradient_penalty_of_a_linear_critic() -> None:
    # D(x) = <w, x> has gradient w everywhere: the penalty is (||w|| - 1)^2 at any interpolate
    w = torch.zeros(1, 2, 2)
    w[0, 0, 0], w[0, 1, 1] = 3.0, 0.0  # ||w|| = 3
    real, fake = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    gp = gradient_penalty(_linear_critic(w), real, fake, generator=torch.Generator().manual_seed(0))
    assert gp.item() == pytest.approx(4.0, rel=1e-5)
    unit = torch.full((1, 2, 2), 0.5)  # ||w|| = 1: no penalty
    assert gradient_penalty(_linear_critic(unit), real, fake).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_penalty_reaches_the_critic_parameters() -> None:
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 1))
    gp = gradient_penalty(critic, torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2))
    gp.backward()
    assert critic[1].weight.grad is not None and critic[1].weight.grad.abs().sum() > 0


def test_r1_penalty_of_a_linear_critic() -> None:
    w = torch.tensor([[[1.0, 2.0], [2.0, 0.0]]])  # ||w||^2 = 9
    real = torch.randn(4, 1, 2, 2, requires_grad=True)
    assert r1_penalty(_linear_critic(w)(real), real).item() == pytest.approx(9.0)


def test_gaussian_kl_matches_torch_distributions() -> None:
    mu, logvar = torch.randn(6, 5), torch.randn(6, 5)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected, rtol=1e-5, atol=1e-5)
    assert gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max() == 0
    # closed form, one dimension: KL(N(1, e) || N(0, 1)) = 0.5 * (e + 1 - 1 - 1)
    assert gaussian_kl(torch.ones(1, 1), torch.ones(1, 1)).item() == pytest.approx(0.5 * (math.e + 1 - 1 - 1))


def test_reconstruction_nll_bernoulli_and_gaussian() -> None:
    x = torch.rand(3, 1, 4, 4) * 2 - 1
    logits = torch.randn(3, 1, 4, 4)
    # Bernoulli NLL for binary targets equals -log p
    xb = torch.where(x > 0, 1.0, -1.0)
    expected = -Bernoulli(logits=logits).log_prob((xb + 1) / 2).flatten(1).sum(1)
    torch.testing.assert_close(reconstruction_nll(logits, xb, "bernoulli"), expected)
    mean = torch.randn(3, 1, 4, 4)
    expected = -Normal(mean, 0.2).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(reconstruction_nll(mean, x, "gaussian", sigma=0.2), expected)
    with pytest.raises(ValueError, match=r"model\.likelihood='laplace'"):
        reconstruction_nll(mean, x, "laplace")


def test_kl_warmup_is_linear_then_beta() -> None:
    assert kl_weight(0, 2.0, 100) == 0.0
    assert kl_weight(50, 2.0, 100) == pytest.approx(1.0)
    assert kl_weight(100, 2.0, 100) == kl_weight(500, 2.0, 100) == 2.0
    assert kl_weight(0, 0.5, 0) == 0.5
