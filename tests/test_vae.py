"""VAE nets and LightningModule: shapes, overfitting one batch, KL warm-up, grids."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from atelier.models.vae import VAE
from atelier.nets.vae import ConvDecoder, ConvEncoder


def _vae(likelihood: str = "bernoulli", **kwargs) -> VAE:
    enc = ConvEncoder(image_size=16, channels=1, latent_dim=4, base_channels=8)
    dec = ConvDecoder(image_size=16, channels=1, latent_dim=4, base_channels=8)
    return VAE(enc, dec, partial(torch.optim.Adam, lr=3e-3), latent_dim=4, likelihood=likelihood, **kwargs)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_encoder_decoder_shapes(size: int) -> None:
    enc, dec = ConvEncoder(size, 3, 6, 8), ConvDecoder(size, 3, 6, 8)
    mu, logvar = enc(torch.randn(2, 3, size, size))
    assert mu.shape == logvar.shape == (2, 6)
    assert dec(mu).shape == (2, 3, size, size)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_reconstruction_loss_falls_when_overfitting_one_batch(likelihood: str) -> None:
    torch.manual_seed(0)
    model = _vae(likelihood)
    x = torch.where(torch.rand(8, 1, 16, 16) > 0.7, 1.0, -1.0)
    opt = model.optimizer_factory(list(model.encoder.parameters()) + list(model.decoder.parameters()))
    recs = []
    for _ in range(150):
        rec, kl, _ = model.terms(x)
        loss = rec.mean() + kl.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        recs.append(rec.mean().item())
    assert recs[-1] < 0.5 * recs[0], (recs[0], recs[-1])


def test_training_logs_elbo_terms_and_warms_up_the_kl() -> None:
    torch.manual_seed(0)
    model = _vae(kl_warmup_steps=100, beta=2.0)
    x = torch.rand(32, 1, 16, 16) * 2 - 1
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    loader = DataLoader(TensorDataset(x), batch_size=8)
    trainer.fit(model, loader, loader)
    m = trainer.callback_metrics
    assert trainer.global_step == 4
    assert m["train/kl_weight"].item() == pytest.approx(2.0 * 3 / 100)  # logged at step index 3
    assert m["train/kl"] >= 0 and m["val/kl"] >= 0
    torch.testing.assert_close(m["val/elbo"], -(m["val/rec"] + m["val/kl"]))
    torch.testing.assert_close(m["val/loss"], -m["val/elbo"])


def test_sample_and_grids() -> None:
    model = _vae()
    a = model.sample(6, generator=torch.Generator().manual_seed(0))
    assert a.shape == (6, 1, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, model.sample(6, generator=torch.Generator().manual_seed(0)))
    x = torch.rand(16, 1, 16, 16) * 2 - 1
    grids = model.visualizations(torch.Generator().manual_seed(0), x)
    rec, nrow = grids["reconstruction"]
    assert rec.shape == (32, 1, 16, 16) and nrow == 8
    torch.testing.assert_close(rec[:8], x[:8])  # first row: the inputs, second row: their reconstructions
    torch.testing.assert_close(rec[8:16], model.reconstruct(x[:8]))
    interp, steps = grids["interpolation"]
    assert interp.shape == (8 * 8, 1, 16, 16) and steps == 8
    assert model.visualizations(None)["interpolation"][0].shape == (64, 1, 16, 16)


def test_bad_values_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"model\.likelihood='poisson'"):
        _vae("poisson")
    with pytest.raises(ValueError, match=r"model\.beta"):
        _vae(beta=-1.0)
