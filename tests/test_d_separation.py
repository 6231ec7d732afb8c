"""The discriminator-separation diagnostic (atelier.metrics.discriminator) on a real conditional GAN module whose D
is swapped for one whose answer is known."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from atelier.metrics.discriminator import discriminator_separation, refit_discriminator
from atelier.models.gan import GAN
from atelier.nets.gan import DCGANDiscriminator, DCGANGenerator


class MeanD(nn.Module):
    """Logit = mean pixel value; records the labels it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor | None] = []

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append(labels)
        return self.w * x.mean(dim=(1, 2, 3))


def _gan() -> GAN:
    g = DCGANGenerator(image_size=16, channels=1, z_dim=8, base_channels=8, num_classes=3)
    d = DCGANDiscriminator(image_size=16, channels=1, base_channels=8, norm="batch", num_classes=3)
    opt = partial(torch.optim.Adam, lr=1e-3)
    return GAN(g, d, opt, opt, ema_decay=0.9)


def _reals(value: float, n: int) -> TensorDataset:
    x = value + 0.01 * torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    return TensorDataset(x.clamp(-1, 1), torch.arange(n) % 3)


def test_a_d_that_separates_scores_auroc_one_and_gets_the_labels() -> None:
    gan = _gan()
    gan.discriminator = MeanD()
    gan.discriminator.train()
    # the untrained G draws images near 0 (tanh of small activations); the reals are bright
    fake_mean = gan.sample(64, generator=torch.Generator().manual_seed(0)).mean().item()
    assert abs(fake_mean) < 0.5
    out = discriminator_separation(gan, _reals(0.9, 60), _reals(0.8, 20), num_samples=50, seed=0)
    assert out["auroc_train"] == pytest.approx(1.0) and out["auroc_heldout"] == pytest.approx(1.0)
    assert out["acc_train"] == pytest.approx(1.0)
    assert out["d_real_train"] == pytest.approx(0.9, abs=0.01) and out["d_real_heldout"] == pytest.approx(0.8, abs=0.01)
    assert out["d_fake"] < 0.5
    assert (out["num_train"], out["num_heldout"], out["num_fake"]) == (50, 20, 50)
    # the projection D is asked with the real images' labels, for reals and fakes alike; its mode is restored
    assert all(torch.equal(y, torch.arange(len(y)) % 3) for y in gan.discriminator.seen)
    assert gan.discriminator.training


def test_reals_like_the_fakes_score_auroc_near_one_half() -> None:
    gan = _gan()
    gan.discriminator = MeanD()
    fakes = gan.sample(200, generator=torch.Generator().manual_seed(5))
    same = TensorDataset(fakes, torch.arange(200) % 3)  # other draws of the same generator
    out = discriminator_separation(gan, same, None, num_samples=200, seed=0)
    assert 0.35 < out["auroc_train"] < 0.65
    assert out["auroc_heldout"] is None and out["num_heldout"] == 0
    with pytest.raises(ValueError, match="num_samples=1"):
        discriminator_separation(gan, same, None, num_samples=1)


def test_refit_trains_a_copy_that_separates_and_leaves_the_gan_alone() -> None:
    torch.manual_seed(0)
    g = DCGANGenerator(image_size=16, channels=1, z_dim=8, base_channels=8, num_classes=3)
    d = DCGANDiscriminator(image_size=16, channels=1, base_channels=8, norm="spectral", num_classes=3)
    opt = partial(torch.optim.Adam, lr=1e-3)
    gan = GAN(g, d, opt, opt, loss="hinge", ema_decay=0.9, diffaugment="translation")
    before = {k: v.clone() for k, v in gan.discriminator.state_dict().items()}
    reals = _reals(0.9, 64)  # bright images; the untrained G draws images near 0
    start = discriminator_separation(gan, reals, None, num_samples=32)
    refit, losses = refit_discriminator(gan, reals, steps=40, batch_size=16, lr=2e-3, seed=0)
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # the hinge loss starts near 2
    out = discriminator_separation(gan, reals, None, num_samples=32, discriminator=refit)
    assert out["auroc_train"] == pytest.approx(1.0) and out["d_real_train"] > out["d_fake"] + 1.0
    assert out["d_real_train"] - out["d_fake"] > start["d_real_train"] - start["d_fake"]
    assert not refit.training and refit is not gan.discriminator
    after = gan.discriminator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the GAN's own D is untouched
    with pytest.raises(ValueError, match="steps=0"):
        refit_discriminator(gan, reals, steps=0)
    with pytest.raises(ValueError, match="fewer than batch_size=128"):
        refit_discriminator(gan, reals, steps=1, batch_size=128)
