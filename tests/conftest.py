"""Shared fixtures: real data location, offline W&B, and Hydra composition of the real configs."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from atelier.utils.hydra_jobs import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEFAULT_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("ATELIER_ROOT", str(ROOT))
os.environ.setdefault("ATELIER_DATA_DIR", str(DEFAULT_DATA))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

DATA_DIR = Path(os.environ["ATELIER_DATA_DIR"])

# the resolvers the entry points register (${atelier.mkdir:...}, ${atelier.cpu_precision:} in trainer/cpu.yaml)
register_resolvers()

# A UNet small enough for a CPU test step in well under a second.
TINY_DDPM = [
    "model.net.block_out_channels=[16,32]",
    "model.net.layers_per_block=1",
    "model.net.attention_resolutions=[]",
    "model.net.norm_num_groups=8",
    "model.net.dropout=0.0",
    "model.num_inference_steps=2",
    "model.compile=false",  # the quick recipes compile; a tiny test run would spend its time compiling
]

# GAN and VAE nets small enough for a CPU test step in well under a second.
TINY_GAN = [
    "model.generator.base_channels=8",
    "model.generator.z_dim=16",
    "model.discriminator.base_channels=8",
    "model.interpolation_rows=2",
    "model.interpolation_steps=3",
    "trainer.gradient_clip_val=null",
]
TINY_VAE = [
    "model.encoder.base_channels=8",
    "model.decoder.base_channels=8",
    "model.latent_dim=4",
    "model.gmm_max_samples=512",  # the end-of-training mixture fit would otherwise encode all 55k images
]
TINY = {"ddpm": TINY_DDPM, "gan": TINY_GAN, "gan_hinge_sn": TINY_GAN, "gan_wgan_gp": TINY_GAN, "vae": TINY_VAE}


def load_script(name: str) -> Any:
    """Import ``scripts/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_cfg(config_name: str, overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Compose a config from ``configs/`` as the entry point would, with the run dir set to ``output_dir``."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose(config_name=config_name, overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def train_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Factory for a small real ``train`` config writing into ``tmp_path``; ``model`` names a ``configs/model``
    file and picks its tiny overrides."""

    def make(*overrides: str, tiny: bool = True, model: str = "ddpm") -> DictConfig:
        base = [f"model={model}", "logger=csv", "print_config=false", "data.num_workers=0"]
        if tiny:
            base += [*TINY[model], "data.batch_size=8", "callbacks.sample_grid.num_samples=4",
                     "callbacks.sample_grid.every_n_steps=0", "~callbacks.rich_progress_bar",
                     "~callbacks.model_summary"]
        return compose_cfg("train", base + list(overrides), tmp_path)

    return make


@pytest.fixture(scope="session")
def art_available() -> Path:
    """The real art folder (``ATELIER_DATA_DIR/art``: 2,787 paintings, one subfolder per artist)."""
    art = DATA_DIR / "art"
    if not any(art.glob("*/*.jpg")):
        pytest.fail(f"the art folder is needed in {art}: set ATELIER_DATA_DIR to ../shared/data")
    return art


@pytest.fixture(scope="session")
def mnist_available() -> Path:
    raw = DATA_DIR / "MNIST" / "raw"
    if not (raw / "train-images-idx3-ubyte").exists() and not (raw / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"real MNIST files are needed in {raw}: set ATELIER_DATA_DIR to ../shared/data")
    return DATA_DIR


@pytest.fixture(scope="session")
def slurm_cluster() -> dict[str, str]:
    """A real one-node SLURM cluster (``scripts/slurm_local_cluster.sh``: Debian's slurm-wlm + munge, installed
    when missing); yields the environment variables that point ``sbatch``/``scontrol`` at it. Stopped at the end
    of the session when this fixture started it.

    Skips where no cluster can be started (no root, no apt, no packages), unless ``ATELIER_REQUIRE_SLURM=1``
    (CI), where that is a failure.
    """
    from tests.slurm_utils import start_local_cluster, stop_local_cluster

    env, started, why = start_local_cluster()
    if env is None:
        if os.environ.get("ATELIER_REQUIRE_SLURM") == "1":
            pytest.fail(f"ATELIER_REQUIRE_SLURM=1 but no SLURM cluster could be started: {why}")
        pytest.skip(f"no SLURM cluster here: {why}")
    yield env
    if started:
        stop_local_cluster()
