"""GAN training throughput through Lightning: the nets of a recipe in the default (NCHW) and channels-last (NHWC)
memory format, on the machine at hand.

    python scripts/bench_gan.py                                   # experiment=gan_art_cpu's nets, batch 64, 64 px
    python scripts/bench_gan.py --experiment gan_mnist_cpu --repeats 3
    python scripts/bench_gan.py --precision 32-true --batches 20

Builds the recipe's model exactly as ``train.py`` would (Hydra compose of ``configs/train.yaml`` with
``experiment=<name>``: G, D, loss, n_critic, DiffAugment, EMA), feeds it random images ``(B, C, S, S)`` in
``[-1, 1]`` (and random labels for a conditional recipe) so that data loading is not timed, and prints the
training batches/s (one batch: a D step, plus a G step every ``n_critic`` batches) after ``--warmup`` batches,
per layout and repeat, then the median ratio channels-last / default. Precision: ``--precision``, default what
``trainer=cpu`` picks here (:func:`atelier.utils.precision.cpu_precision`).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_train import StepTimer  # noqa: E402  (wall time of the batches after the warm-up)

from atelier.utils.allocator import tune_cpu_allocator  # noqa: E402
from atelier.utils.hydra_jobs import register_resolvers  # noqa: E402
from atelier.utils.precision import cpu_precision  # noqa: E402


def recipe_config(experiment: str, channels_last: bool) -> DictConfig:
    """The composed train config of ``experiment=<experiment>`` with ``model.channels_last`` set."""
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}",
                                                      f"model.channels_last={str(channels_last).lower()}"])
    return cfg


def batches_per_s(experiment: str, channels_last: bool, precision: str, batches: int, warmup: int,
                  batch_size: int | None) -> tuple[float, int]:
    """Training batches/s of the recipe's GAN on random data, and the batch size used."""
    cfg = recipe_config(experiment, channels_last)
    b = int(batch_size or cfg.data.batch_size)
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.model)
    size, channels = int(cfg.data.image_size), int(cfg.data.channels)
    n = b * (warmup + batches)
    x = torch.rand(n, channels, size, size) * 2 - 1
    tensors = [x] if model.num_classes is None else [x, torch.randint(0, model.num_classes, (n,))]
    loader = DataLoader(TensorDataset(*tensors), batch_size=b, shuffle=False, drop_last=True)
    timer = StepTimer(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer])
    trainer.fit(model, train_dataloaders=loader)
    return batches / (timer.end - timer.start), b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="gan_art_cpu", help="a GAN recipe in configs/experiment")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's data.batch_size")
    parser.add_argument("--repeats", type=int, default=2, help="runs per layout, alternating")
    parser.add_argument("--precision", default=None, help="default: what trainer=cpu picks on this CPU")
    args = parser.parse_args()
    print(f"glibc malloc tuning (atelier.utils.allocator): {'on' if tune_cpu_allocator() else 'off'}", flush=True)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    precision = args.precision or cpu_precision()
    print(f"experiment={args.experiment}, precision {precision}, {torch.get_num_threads()} threads")
    results: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(args.repeats):
        for channels_last in (False, True):
            rate, b = batches_per_s(args.experiment, channels_last, precision, args.batches, args.warmup,
                                    args.batch_size)
            results[channels_last].append(rate)
            layout = "channels-last" if channels_last else "default (NCHW)"
            print(f"  repeat {repeat + 1} {layout:15s} {rate:6.2f} batches/s  {rate * b:7.1f} images/s", flush=True)
    base, cl = statistics.median(results[False]), statistics.median(results[True])
    print(f"median: default {base:.2f}, channels-last {cl:.2f} batches/s; channels-last / default = {cl / base:.2f}x")


if __name__ == "__main__":
    main()
