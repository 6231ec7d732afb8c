"""Restore images with a trained model: `python restore.py ckpt_path=... input=<file or folder>`
(see configs/restore.yaml)."""

import os
from pathlib import Path

os.environ.setdefault("ATELIER_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="restore")
def main(cfg: DictConfig) -> None:
    from atelier.tasks.restore import run

    run(cfg)


if __name__ == "__main__":
    main()
