"""The VAE's ex-post Gaussian-mixture sampling prior (Ghosh et al. 2020, Sec. 4): the fit, sampling from the
stored mixture, the N(0, I) fallback, the fit at the end of training (before the final grid), checkpoints and
scripts/fit_vae_prior.py."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from atelier.callbacks.checkpoint_extras import CONFIG_KEY
from atelier.callbacks.samples import SampleGrid, save_grid
from atelier.models import vae as vae_module
from atelier.models.latent_prior import GaussianMixturePrior, fit_gaussian_mixture, posterior_means
from atelier.models.vae import VAE
from atelier.nets.vae import ConvDecoder, ConvEncoder
from atelier.tasks import sample as sample_task
from atelier.tasks import train as train_task
from tests.conftest import TINY, compose_cfg, load_script

PRIOR_KEYS = ("prior.weights", "prior.means", "prior.scale_tril")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _vae(**kwargs) -> VAE:
    enc = ConvEncoder(image_size=16, channels=1, latent_dim=4, base_channels=8)
    dec = ConvDecoder(image_size=16, channels=1, latent_dim=4, base_channels=8)
    return VAE(enc, dec, partial(torch.optim.Adam, lr=3e-3), latent_dim=4, **kwargs)


def _blobs(n: tuple[int, ...] = (1000, 600, 400)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three well-separated 2-d Gaussian blobs with different covariances: (points, means, covariances)."""
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[-6.0, 0.0], [6.0, 1.0], [0.0, 8.0]])
    scale = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.3, 0.0], [0.0, 1.2]], [[0.8, 0.0], [-0.4, 0.4]]])
    points = torch.cat([means[i] + torch.randn(k, 2, generator=g) @ scale[i].T for i, k in enumerate(n)])
    return points, means, scale @ scale.transpose(1, 2)


def test_fit_recovers_the_clusters_of_separated_blobs() -> None:
    points, means, covs = _blobs()
    fit = fit_gaussian_mixture(points, components=3, seed=0)
    assert fit.weights.shape == (3,) and fit.means.shape == (3, 2) and fit.scale_tril.shape == (3, 2, 2)
    order = torch.cdist(means, fit.means).argmin(1)  # the fitted component nearest to each true mean
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(fit.means[order], means, atol=0.15, rtol=0)
    torch.testing.assert_close(fit.weights[order], torch.tensor([0.5, 0.3, 0.2]), atol=0.01, rtol=0)
    cov = fit.scale_tril @ fit.scale_tril.transpose(1, 2)
    torch.testing.assert_close(cov[order], covs, atol=0.15, rtol=0)
    assert torch.all(torch.tril(fit.scale_tril) == fit.scale_tril)  # lower-triangular Cholesky factors
    assert fit.converged and fit.num_samples == 2000
    assert fit.mean_log_likelihood > fit.standard_log_likelihood + 10  # far from N(0, I)


def test_fit_rejects_bad_input_and_caps_k_at_the_number_of_points(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match=r"gmm_components must be >= 1"):
        fit_gaussian_mixture(torch.randn(10, 2), components=0)
    with pytest.raises(ValueError, match="NaN"):
        fit_gaussian_mixture(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), components=1)
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        fit_gaussian_mixture(torch.randn(10), components=1)
    with caplog.at_level(logging.WARNING):
        fit = fit_gaussian_mixture(torch.randn(4, 3), components=10)
    assert fit.weights.shape == (4,) and "fitting 4 components" in caplog.text


def _known_mixture() -> GaussianMixturePrior:
    prior = GaussianMixturePrior(latent_dim=3, components=2)
    weights = torch.tensor([0.7, 0.3])
    means = torch.tensor([[2.0, -1.0, 0.0], [-3.0, 4.0, 1.0]])
    scale_tril = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.4, 0.0], [0.0, -0.3, 0.2]],
                               [[0.3, 0.0, 0.0], [0.0, 2.0, 0.0], [0.6, 0.0, 0.5]]])
    prior.set_mixture(weights, means, scale_tril)
    return prior


def test_sampled_latents_have_the_mixtures_mean_and_covariance() -> None:
    prior = _known_mixture()
    z = prior.sample(200_000, generator=torch.Generator().manual_seed(0)).double()
    w, mu, tril = prior.weights.double(), prior.means.double(), prior.scale_tril.double()
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (tril @ tril.transpose(1, 2) + mu[:, :, None] * mu[:, None, :])).sum(0)
    cov = second - torch.outer(mean, mean)
    assert z.shape == (200_000, 3)
    torch.testing.assert_close(z.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), cov, atol=0.06, rtol=0)
    # the component of each latent (nearest mean, well separated here) follows the weights
    share = (torch.cdist(z, mu).argmin(1) == 0).double().mean()
    assert abs(share.item() - 0.7) < 0.01
    same = prior.sample(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, prior.sample(50, generator=torch.Generator().manual_seed(0)))  # same seed, same z
    assert not torch.equal(same, prior.sample(50, generator=torch.Generator().manual_seed(1)))
    assert prior.sample(0).shape == (0, 3)


def test_vae_samples_from_the_mixture_same_seed_same_images() -> None:
    model = _vae()
    model.prior.set_mixture(torch.tensor([0.5, 0.5]), torch.tensor([[3.0, 0, 0, 0], [-3.0, 0, 0, 0]]),
                            torch.eye(4).repeat(2, 1, 1) * 0.1)
    z = model.prior_latents(500, _gen(0))
    assert torch.equal(z, model.prior.sample(500, _gen(0)))
    assert (z[:, 0].abs() > 2).all()  # from the mixture, not N(0, I)
    assert torch.equal(model.prior_latents(5, _gen(0), sampling_prior="standard"), torch.randn(5, 4, generator=_gen(0)))
    a = model.sample(6, generator=_gen(0))
    assert a.shape == (6, 1, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, model.sample(6, generator=_gen(0)))
    assert not torch.allclose(a, model.sample(6, generator=_gen(0), sampling_prior="standard"))
    standard = _vae(sampling_prior="standard")
    standard.load_state_dict(model.state_dict())
    expected = model.sample(6, generator=_gen(0), sampling_prior="standard")
    assert torch.equal(standard.sample(6, generator=_gen(0)), expected)


def test_unfitted_mixture_falls_back_to_standard_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = _vae()
    assert not model.prior.fitted
    with caplog.at_level(logging.WARNING, logger="atelier.models.vae"):
        a = model.sample(4, generator=torch.Generator().manual_seed(0))
        b = model.sample(4, generator=torch.Generator().manual_seed(0))
    warnings = [r for r in caplog.records if "no Gaussian mixture is fitted" in r.getMessage()]
    assert len(warnings) == 1 and "scripts/fit_vae_prior.py" in warnings[0].getMessage()
    assert torch.equal(a, b)
    assert torch.equal(a, model.sample(4, generator=torch.Generator().manual_seed(0), sampling_prior="standard"))
    with pytest.raises(RuntimeError, match="no Gaussian mixture"):
        model.prior.sample(3)


def test_bad_prior_settings_name_the_key_and_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"model\.sampling_prior='flow'.*\['gmm', 'standard'\]"):
        _vae(sampling_prior="flow")
    with pytest.raises(ValueError, match=r"model\.gmm_components must be >= 1"):
        _vae(gmm_components=0)
    with pytest.raises(ValueError, match=r"model\.gmm_max_samples"):
        _vae(gmm_max_samples=0)
    with pytest.raises(ValueError, match=r"model\.gmm_reg_covar"):
        _vae(gmm_reg_covar=-1.0)
    with pytest.raises(ValueError, match=r"\['gmm', 'standard'\]"):
        _vae().sample(2, sampling_prior="normal")


def test_state_dict_without_mixture_loads_unfitted_and_another_k_resizes() -> None:
    fitted = _vae(gmm_components=3)
    fitted.fit_prior([torch.rand(30, 1, 16, 16) * 2 - 1])
    old = {k: v for k, v in fitted.state_dict().items() if not k.startswith("prior.")}
    fresh = _vae()
    fresh.load_state_dict(old)  # strict: a checkpoint from before the mixture still loads
    assert not fresh.prior.fitted
    fresh.load_state_dict(fitted.state_dict())  # k = 3 in the state dict, 10 in the model
    assert fresh.prior.fitted and fresh.prior.weights.shape == (3,) and fresh.prior.scale_tril.shape == (3, 4, 4)
    assert torch.equal(fresh.sample(4, _gen(0)), fitted.sample(4, _gen(0)))


def test_posterior_means_use_eval_mode_and_caps() -> None:
    model = _vae()
    x = torch.rand(20, 1, 16, 16) * 2 - 1
    model.train()
    mu = posterior_means(model.encoder, [(x[:8], None), (x[8:16], None), (x[16:], None)], max_samples=11)
    assert model.encoder.training  # mode restored
    model.eval()
    torch.testing.assert_close(mu, model.encoder(x[:11])[0])
    assert posterior_means(model.encoder, [x[:8], x[8:16], x[16:]], max_batches=2).shape == (16, 4)
    with pytest.raises(ValueError, match="no images"):
        posterior_means(model.encoder, [])


# --------------------------------------------------------------------------- fit at the end of training
def _fit_tiny(tmp_path: Path, callbacks: list[L.Callback] | None = None,
              **trainer_kwargs) -> tuple[VAE, SampleGrid, L.Trainer]:
    torch.manual_seed(0)
    model = _vae(gmm_components=3)
    grid = SampleGrid(str(tmp_path / "samples"), every_n_steps=0, num_samples=9, seed=5)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[*(callbacks or []), grid],
                        **trainer_kwargs)
    x = torch.rand(32, 1, 16, 16) * 2 - 1
    trainer.fit(model, DataLoader(TensorDataset(x), batch_size=8))
    return model, grid, trainer


class _StopAfter(L.Callback):
    """Sets ``trainer.should_stop`` after ``steps`` optimiser steps, as Lightning's ``Timer`` (``max_time``) does."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


@pytest.mark.parametrize(("stop", "steps"), [({"max_epochs": 2}, 8), ({"max_steps": 3, "max_epochs": -1}, 3),
                                             ({"max_epochs": 5, "callbacks": [_StopAfter(2)]}, 2)])
def test_final_grid_is_drawn_from_the_fitted_mixture(tmp_path: Path, stop: dict, steps: int) -> None:
    """Lightning calls every callback's on_train_end before the module's; the mixture is fitted at the end of
    the last epoch (also one cut short by max_steps or should_stop), so SampleGrid's final.png comes from it."""
    model, _, trainer = _fit_tiny(tmp_path, **stop)
    assert model.prior.fitted
    assert trainer.global_step == steps
    assert torch.isfinite(trainer.callback_metrics["train/prior_loglik"])
    assert "train/prior_loglik_standard" in trainer.callback_metrics
    save_grid(model.sample(9, generator=torch.Generator().manual_seed(5)), tmp_path / "gmm.png", nrow=3)
    save_grid(model.sample(9, generator=torch.Generator().manual_seed(5), sampling_prior="standard"),
              tmp_path / "standard.png", nrow=3)
    final = (tmp_path / "samples" / "final.png").read_bytes()
    assert final == (tmp_path / "gmm.png").read_bytes()
    assert final != (tmp_path / "standard.png").read_bytes()


def test_stop_not_foreseen_at_epoch_end_is_fitted_in_on_train_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(vae_module, "_training_ends_after_this_epoch", lambda trainer: False)
    with caplog.at_level(logging.WARNING, logger="atelier.models.vae"):
        model, _, _ = _fit_tiny(tmp_path, max_epochs=1)
    assert model.prior.fitted
    assert "fitting the mixture now" in caplog.text


def test_standard_prior_fits_nothing_and_a_new_run_drops_a_loaded_mixture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _vae(sampling_prior="standard")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, DataLoader(TensorDataset(torch.rand(16, 1, 16, 16) * 2 - 1), batch_size=8))
    assert not model.prior.fitted and "train/prior_loglik" not in trainer.callback_metrics
    gmm = _vae(gmm_components=2)
    gmm.fit_prior([torch.rand(16, 1, 16, 16)])
    gmm.hparams.sampling_prior = "standard"
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(gmm, DataLoader(TensorDataset(torch.rand(16, 1, 16, 16) * 2 - 1), batch_size=8))
    assert not gmm.prior.fitted  # it described the weights before this run


def test_fit_leaves_the_global_rng_untouched() -> None:
    model = _vae(gmm_components=2)
    loader = DataLoader(TensorDataset(torch.rand(16, 1, 16, 16)), batch_size=4, shuffle=True)
    state = torch.get_rng_state()
    model.fit_prior(loader)
    assert torch.equal(state, torch.get_rng_state())


# --------------------------------------------------------------------------- real train task, checkpoint, script
TINY_RUN = ["model=vae", *TINY["vae"], "model.gmm_components=3", "data.image_size=16", "data.batch_size=8",
            "data.val_size=64", "data.num_workers=0", "trainer.max_steps=3", "trainer.limit_train_batches=5",
            "trainer.limit_val_batches=1", "logger=csv", "print_config=false", "export_pipeline=false",
            "callbacks.sample_grid.num_samples=4", "callbacks.sample_grid.every_n_steps=0",
            "callbacks.model_checkpoint.every_n_train_steps=null", "~callbacks.rich_progress_bar",
            "~callbacks.model_summary"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, mnist_available: Path) -> Path:
    """A 3-step tiny VAE run on real MNIST (16 px) through the train task; returns its output directory."""
    out = tmp_path_factory.mktemp("vae_gmm_run")
    train_task.run(compose_cfg("train", TINY_RUN, out))
    return out


def test_trained_checkpoint_holds_the_mixture_and_samples_from_it(tiny_run: Path) -> None:
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    sd = state["state_dict"]
    assert all(k in sd for k in PRIOR_KEYS)
    assert sd["prior.weights"].shape == (3,) and sd["prior.means"].shape == (3, 4)
    assert sd["prior.scale_tril"].shape == (3, 4, 4)
    torch.testing.assert_close(sd["prior.weights"].sum(), torch.tensor(1.0))
    assert state[CONFIG_KEY]["model"]["sampling_prior"] == "gmm"
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["train/prior_loglik"] > metrics["train/prior_loglik_standard"]  # fits the codes better
    assert (tiny_run / "samples" / "final.png").is_file()

    model = sample_task.load_module(ckpt)
    assert model.prior.fitted
    a = model.sample(5, generator=_gen(0))
    assert a.shape == (5, 1, 16, 16) and a.dtype == torch.float32 and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, model.sample(5, generator=_gen(0)))
    assert not torch.allclose(a, model.sample(5, generator=_gen(0), sampling_prior="standard"))
    assert not torch.equal(a, model.sample(5, generator=_gen(1)))


def _script():
    return load_script("fit_vae_prior")


def test_script_upgrades_a_checkpoint_without_mixture(tiny_run: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # a checkpoint from before the mixture existed: no prior buffers, no gmm keys in its stored model config
    state = torch.load(tiny_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("prior.")}
    state[CONFIG_KEY]["model"] = {k: v for k, v in state[CONFIG_KEY]["model"].items()
                                  if k != "sampling_prior" and not k.startswith("gmm_")}
    old = tmp_path / "run" / "checkpoints" / "last.ckpt"
    old.parent.mkdir(parents=True)
    torch.save(state, old)
    before = old.read_bytes()
    legacy = sample_task.load_module(old)
    assert not legacy.prior.fitted
    with caplog.at_level(logging.WARNING, logger="atelier.models.vae"):
        legacy_images = legacy.sample(4, generator=torch.Generator().manual_seed(0))  # N(0, I), with a warning
    assert "no Gaussian mixture is fitted" in caplog.text

    result = _script().main([str(old), "--components", "2", "--max-samples", "500"])
    new = old.with_name("last_gmm.ckpt")
    assert result["out"] == str(new) and result["components"] == 2 and result["num_samples"] == 500
    assert old.read_bytes() == before  # the input is not touched
    upgraded = torch.load(new, map_location="cpu", weights_only=True)
    assert upgraded["state_dict"]["prior.weights"].shape == (2,)
    assert upgraded[CONFIG_KEY]["model"]["sampling_prior"] == "gmm"
    assert upgraded[CONFIG_KEY]["model"]["gmm_components"] == 2
    assert upgraded["global_step"] == state["global_step"] and upgraded["optimizer_states"]
    for key, value in state["state_dict"].items():  # the networks are unchanged
        torch.testing.assert_close(upgraded["state_dict"][key], value, rtol=0, atol=0)

    model = sample_task.load_module(new)
    assert model.prior.fitted and model.hparams.sampling_prior == "gmm"
    a = model.sample(4, generator=_gen(0))
    assert torch.equal(a, model.sample(4, generator=_gen(0)))
    assert not torch.allclose(a, legacy_images)
    assert torch.equal(model.sample(4, generator=_gen(0), sampling_prior="standard"), legacy_images)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        _script().main([str(tmp_path / "missing.ckpt")])
