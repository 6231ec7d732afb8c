"""Train a generative model: `python train.py model=ddpm data=mnist` (see configs/train.yaml)."""

import os
from pathlib import Path

os.environ.setdefault("ATELIER_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from atelier.tasks.train import metric_value, run

    return metric_value(run(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
