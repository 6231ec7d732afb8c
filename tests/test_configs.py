"""Every config group composes, and its objects instantiate with the real classes."""

from __future__ import annotations

import hydra
import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from atelier.utils.precision import cpu_precision
from tests.conftest import CONFIGS, compose_cfg

# groups of train.yaml; feature_extractor belongs to evaluate.yaml and the FID callback
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONFIGS.iterdir()
          if g.is_dir() and g.name not in {"local", "hydra", "paths", "feature_extractor", "sweeps"}}
FEATURE_EXTRACTORS = sorted(p.stem for p in (CONFIGS / "feature_extractor").glob("*.yaml"))


def test_groups_asked_for_by_the_foundation_exist() -> None:
    expected = {
        "data": {"mnist", "art"}, "model": {"ddpm"}, "trainer": {"default", "cpu", "gpu", "ddp"},
        "logger": {"wandb", "csv", "tensorboard"}, "callbacks": {"default"}, "debug": {"fdr", "overfit"},
        "experiment": {"ddpm_mnist_cpu"},
    }
    for group, names in expected.items():
        assert names <= set(GROUPS[group]), (group, GROUPS[group])


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes(group: str, option: str, tmp_path) -> None:
    cfg = compose_cfg("train", [f"{group}={option}"], tmp_path)
    assert cfg.data._target_ and cfg.model._target_ and cfg.trainer._target_
    if group == "launcher":
        # launcher configs read ${hydra:launcher.*}, which resolves only inside a Hydra run (tests/test_scale_out.py)
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "trainer"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("option", FEATURE_EXTRACTORS)
def test_every_feature_extractor_composes(option: str, tmp_path) -> None:
    cfg = compose_cfg("evaluate", ["ckpt_path=x.ckpt", f"feature_extractor={option}"], tmp_path)
    assert cfg.feature_extractor.name == option
    OmegaConf.to_container(cfg, resolve=True)



def test_fid_callback_group_composes_into_train(tmp_path) -> None:
    cfg = compose_cfg("train", ["callbacks=[default,fid]"], tmp_path)
    assert cfg.callbacks.fid._target_ == "atelier.callbacks.fid.FIDCallback"
    assert cfg.callbacks.fid.feature_extractor.name == "mnist_classifier"
    assert "sample_grid" in cfg.callbacks


@pytest.mark.parametrize(("data", "extractor"), [("mnist", "mnist_classifier"), ("art", "art_classifier")])
def test_fid_callback_features_follow_the_data(data: str, extractor: str, tmp_path) -> None:
    cfg = compose_cfg("train", ["callbacks=[default,fid]", f"data={data}"], tmp_path)
    assert cfg.callbacks.fid.feature_extractor.name == extractor
    # the headline art sweep measures paintings with the painting classifier
    cfg = compose_cfg("train", ["model=gan", f"data={data}", "hparams_search=gan_optuna"], tmp_path)
    assert cfg.callbacks.fid.feature_extractor.name == extractor
    cfg = compose_cfg("train", ["callbacks=[default,fid]", f"data={data}",
                                "feature_extractor@callbacks.fid.feature_extractor=inception"], tmp_path)
    assert cfg.callbacks.fid.feature_extractor.name == "inception"


def test_fid_callback_without_features_for_the_data_names_the_override(tmp_path) -> None:
    cfg = compose_cfg("train", ["callbacks=[default,fid]", "data=art_captions"], tmp_path)
    assert cfg.callbacks.fid.feature_extractor is None
    with pytest.raises(InstantiationException, match=r"feature_extractor@callbacks.fid.feature_extractor=art_"):
        hydra.utils.instantiate(cfg.callbacks.fid)


def test_train_config_keys(tmp_path) -> None:
    cfg = compose_cfg("train", [], tmp_path)
    for key in ("seed", "ckpt_path", "task_name", "tags", "data", "model", "trainer", "logger", "callbacks", "paths"):
        assert key in cfg, key
    assert set(cfg.logger) == {"wandb", "csv"}


@pytest.mark.parametrize("data", ["mnist", "art"])
def test_model_and_data_instantiate(data: str, tmp_path) -> None:
    cfg = compose_cfg("train", [f"data={data}", "data.image_size=32"], tmp_path)
    dm = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    assert model.image_shape == (cfg.data.channels, 32, 32)
    assert dm.hparams.image_size == 32


@pytest.mark.parametrize(("data", "overrides", "attention_at"), [
    ("mnist", [], [8]),                                                  # 32 px: 32, 16, 8
    ("art", [], [16]),                                                   # the art folder's 64 px: 64, 32, 16
    ("art", ["model.net.block_out_channels=[64,128,128,256]"], [8]),     # four levels at 64 px
])
def test_default_ddpm_puts_attention_at_its_lowest_level(data: str, overrides: list[str], attention_at: list[int],
                                                         tmp_path) -> None:
    cfg = compose_cfg("train", [f"data={data}", *overrides], tmp_path)
    assert list(cfg.model.net.attention_resolutions) == attention_at
    net = hydra.utils.instantiate(cfg.model.net)
    levels = len(cfg.model.net.block_out_channels)
    # diffusers names a level with self-attention AttnDownBlock2D; only the lowest level has one
    assert [type(b).__name__.startswith("Attn") for b in net.down_blocks] == [False] * (levels - 1) + [True]


def test_attention_at_a_missing_resolution_names_the_key_and_the_choices(tmp_path) -> None:
    cfg = compose_cfg("train", ["data=art", "model.net.attention_resolutions=[8]"], tmp_path)
    with pytest.raises(InstantiationException, match=r"model\.net\.attention_resolutions: \[8\].*\[64, 32, 16\]"):
        hydra.utils.instantiate(cfg.model.net)


def test_experiment_overrides_only_what_differs(tmp_path) -> None:
    cfg = compose_cfg("train", ["experiment=ddpm_mnist_cpu"], tmp_path)
    assert cfg.task_name == "ddpm_mnist_cpu"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == cpu_precision()  # the hardware rule
    assert cfg.data.image_size == 28
    assert cfg.model.net.image_size == 28  # follows data.image_size by interpolation


def test_edm_experiment_is_the_quick_ddpm_with_edm(tmp_path) -> None:
    quick = compose_cfg("train", ["experiment=ddpm_mnist_cpu"], tmp_path)
    cfg = compose_cfg("train", ["experiment=ddpm_edm_mnist_cpu"], tmp_path)
    assert cfg.task_name == "ddpm_edm_mnist_cpu"
    assert (cfg.model.parameterization, cfg.model.sampler) == ("edm", "edm_dpmpp")
    assert cfg.model.net == quick.model.net and cfg.model.optimizer == quick.model.optimizer
    assert cfg.callbacks.time_budget == quick.callbacks.time_budget and cfg.data == quick.data
    assert cfg.callbacks.posthoc_ema.sigma_rels == [0.05, 0.10] and "posthoc_ema" not in quick.callbacks
    model = hydra.utils.instantiate(cfg.model)
    assert model.edm is not None and model.edm.sigma_data == 0.5


def test_gpu_art_experiment_is_the_art_recipe_at_64_px_on_a_gpu(tmp_path) -> None:
    cpu = compose_cfg("train", ["experiment=ddpm_art_cpu"], tmp_path)
    cfg = compose_cfg("train", ["experiment=ddpm_art_gpu"], tmp_path)
    assert cfg.task_name == "ddpm_art_gpu" and cfg.trainer.accelerator == "gpu"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.callbacks.time_budget.budget == "00:00:10:00"
    assert cfg.data.image_size == 64 and cfg.data.labels == cpu.data.labels == "folders"
    for key in ("prediction_type", "beta_schedule", "sampler", "num_inference_steps", "num_classes",
                "cond_drop_prob", "guidance_scale"):
        assert cfg.model[key] == cpu.model[key], key
    model = hydra.utils.instantiate(cfg.model)
    assert model.image_shape == (3, 64, 64)
    out = model.net(torch.randn(2, 3, 64, 64), torch.tensor([10, 500]), class_labels=torch.tensor([0, 3])).sample
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
    n_params = sum(p.numel() for p in model.net.parameters())
    assert n_params > 4 * sum(p.numel() for p in hydra.utils.instantiate(cpu.model).net.parameters())


def test_sample_config_composes(tmp_path) -> None:
    cfg = compose_cfg("sample", ["ckpt_path=x.ckpt"], tmp_path)
    assert cfg.ckpt_path == "x.ckpt" and cfg.num_samples == 64


def test_unknown_group_option_names_the_allowed_ones() -> None:
    with pytest.raises(Exception, match=r"(?s)data/nonsense.*mnist"):
        compose_cfg("train", ["data=nonsense"])


def test_unknown_key_is_named() -> None:
    with pytest.raises(Exception, match="not_a_key"):
        compose_cfg("train", ["model.not_a_key=1"])


def test_feature_cluster_gan_is_the_art_gan_on_30_feature_clusters(tmp_path) -> None:
    base = compose_cfg("train", ["experiment=gan_art_cpu"], tmp_path)
    cfg = compose_cfg("train", ["experiment=gan_featclusters_art_cpu"], tmp_path)
    assert cfg.task_name == "gan_featclusters_art_cpu" and cfg.sampling.label_distribution == "prior"
    assert (cfg.data.labels, cfg.data.cluster_space, cfg.data.num_clusters) == ("kmeans", "art_features", 30)
    assert cfg.model.generator.num_classes == cfg.model.discriminator.num_classes == 30
    for key in ("loss", "n_critic", "diffaugment", "ema_decay", "optimizer_g", "optimizer_d"):
        assert cfg.model[key] == base.model[key], key
    assert cfg.callbacks.time_budget == base.callbacks.time_budget and cfg.data.image_size == base.data.image_size
    model = hydra.utils.instantiate(cfg.model)
    images = model.sample(4, generator=torch.Generator().manual_seed(0), labels=torch.tensor([0, 10, 26, 29]))
    assert images.shape == (4, 3, 64, 64) and float(images.abs().max()) <= 1
