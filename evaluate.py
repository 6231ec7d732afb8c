"""Evaluate any Atelier checkpoint: `python evaluate.py ckpt_path=... metrics=[fid,kid,is] num_samples=10000`."""

import os
from pathlib import Path

os.environ.setdefault("ATELIER_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from atelier.tasks.evaluate import run

    metrics = run(cfg)["metrics"]
    return metrics.get("fid")


if __name__ == "__main__":
    main()
