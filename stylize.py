"""Style transfer: `python stylize.py content=photo.jpg style=painting.jpg` (see configs/stylize.yaml)."""

import os
from pathlib import Path

os.environ.setdefault("ATELIER_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="stylize")
def main(cfg: DictConfig) -> None:
    from atelier.tasks.stylize import run

    run(cfg)


if __name__ == "__main__":
    main()
