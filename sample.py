"""Sample from any Atelier checkpoint: `python sample.py ckpt_path=... num_samples=64 sampler=ddim`."""

import os
from pathlib import Path

os.environ.setdefault("ATELIER_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    from atelier.tasks.sample import run

    run(cfg)


if __name__ == "__main__":
    main()
