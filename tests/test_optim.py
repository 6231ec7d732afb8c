"""Optimisers built from config partials (``atelier.models.optim.make_optimizer``): ``betas`` written as ints in a
config (``[0, 0.99]``, β1 = 0 as GAN papers write it) work, and a refused argument names its config key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from atelier.models.optim import make_optimizer
from atelier.tasks import train as train_task


def _partial(**keywords: object):
    return instantiate(OmegaConf.create({"_target_": "torch.optim.Adam", "_partial_": True, **keywords}))


def test_int_betas_from_a_config_become_floats() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    factory = _partial(lr=1e-3, betas=[0, 0.99])
    with pytest.raises(ValueError, match="betas must be either both floats"):
        factory(params)  # what torch does with Hydra's [0, 0.99] on its own
    opt = make_optimizer(factory, params, "model.optimizer_d")
    assert opt.param_groups[0]["betas"] == (0.0, 0.99)
    assert all(type(b) is float for b in opt.param_groups[0]["betas"])
    assert opt.param_groups[0]["lr"] == 1e-3


def test_a_refused_argument_names_the_key() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"model\.optimizer_g \(Adam.*Invalid learning rate"):
        make_optimizer(_partial(lr=-1.0), params, "model.optimizer_g")
    with pytest.raises(ValueError, match=r"model\.optimizer \(Adam.*momentum"):
        make_optimizer(_partial(lr=1e-3, momentum=0.9), params)  # Adam has no momentum argument


def test_gan_trains_with_beta1_zero_written_as_an_int(train_cfg, mnist_available, tmp_path: Path) -> None:
    cfg = train_cfg("data.image_size=16", "debug=fdr", "model.optimizer_g.betas=[0,0.99]",
                    "model.optimizer_d.betas=[0,0.9]", model="gan")
    metrics = train_task.run(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/d_loss"]))
    bad = train_cfg("data.image_size=16", "debug=fdr", "model.optimizer_d.lr=-0.1", model="gan")
    with pytest.raises(ValueError, match=r"model\.optimizer_d"):
        train_task.run(bad)
