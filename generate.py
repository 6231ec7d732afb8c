"""Stable Diffusion text-to-image / image-to-image: `python generate.py model_id=... prompt="..." num_images=4`."""

import os
from pathlib import Path

os.environ.setdefault("ATELIER_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    from atelier.tasks.generate import run

    run(cfg)


if __name__ == "__main__":
    main()
