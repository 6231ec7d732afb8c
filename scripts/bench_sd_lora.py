"""Benchmark LoRA training steps on the full-size Stable Diffusion 1.5 architecture with random weights
(``model_id=sd15_random``): seconds per step, peak memory (RSS on a CPU, CUDA memory on a GPU) and trainable
parameters, with each memory/speed feature switchable. The weights are random: the figures are about memory and
speed only, never about image quality.

    python scripts/bench_sd_lora.py                                    # 512 px, batch 1, rank 4, sd_lora_art features
    python scripts/bench_sd_lora.py --resolution 256 --steps 3
    python scripts/bench_sd_lora.py --no-gradient-checkpointing --no-cache-latents   # toggle features one by one
    python scripts/bench_sd_lora.py --compare --device cuda --batch-size 4           # every feature off in turn
    python scripts/bench_sd_lora.py --model tiny --resolution 32 --steps 2           # the script's own smoke test

Features (defaults: as in ``experiment=sd_lora_art``): ``--gradient-checkpointing``, ``--cache-latents`` (latents
and text embeddings, encoded once before the timed steps; the encoding time is printed apart),
``--frozen-precision auto|fp32|bf16`` (VAE + text encoder), ``--optimizer-variant auto|adamw|fused|8bit`` and
``--precision auto|32-true|bf16-mixed`` (the trainer's; ``auto``: bf16-mixed on CUDA, ``trainer=cpu``'s rule on a
CPU). Peak RSS is the process's high-water mark (``resource.getrusage``: model build included) and the highest RSS
sampled every 20 ms during the training steps (``psutil``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import psutil
import torch
from PIL import Image

from atelier.data.captioned_folder import CaptionedFolderDataModule
from atelier.models.sd_lora import StableDiffusionLoRA, lora_parameter_count
from atelier.text2image.weights import resolve_model
from atelier.utils.precision import cpu_precision

GIB = 2**30


class StepMeter(L.Callback):
    """Wall time of every training step, of the fit start (latent caching), and the RSS peak during the steps."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.fit_start = self.train_start = 0.0
        self._t = 0.0
        self.rss_peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.rss_peak = max(self.rss_peak, proc.memory_info().rss)
            time.sleep(0.02)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_start = time.perf_counter()
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._sync(trainer)
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._sync(trainer)
        self.steps.append(time.perf_counter() - self._t)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def image_folder(root: Path, n: int, size: int) -> Path:
    """``n`` smooth random RGB images of ``size`` px (upsampled 8 px noise) with sidecar captions."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        small.resize((size, size), Image.Resampling.BICUBIC).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"an impressionist painting number {i}, harbour, dawn")
    return root


def trainable_counts(model_dir: Path, targets: list[str]) -> dict[str, int]:
    """LoRA parameter counts at ranks 4, 16 and 64 (the UNet built on the meta device from its config)."""
    from diffusers import UNet2DConditionModel

    config = json.loads((model_dir / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return {f"rank_{r}": lora_parameter_count(unet, r, targets) for r in (4, 16, 64)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.device.startswith("cuda")
    precision = args.precision
    if precision == "auto":
        precision = "bf16-mixed" if cuda else cpu_precision()
    work = Path(args.dir).expanduser()
    model_dir = resolve_model(args.model, work / "tiny_sd")
    start = time.perf_counter()
    torch.manual_seed(0)
    module = StableDiffusionLoRA(str(model_dir), functools.partial(torch.optim.AdamW, lr=1e-4), rank=args.rank,
                                 alpha=float(args.rank), gradient_checkpointing=args.gradient_checkpointing,
                                 frozen_precision=args.frozen_precision, optimizer_variant=args.optimizer_variant,
                                 validation_prompts=[], tiny_dir=str(work / "tiny_sd"))
    build_s = time.perf_counter() - start
    rss_after_build = psutil.Process().memory_info().rss
    n_images = max(2, args.batch_size * args.steps)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        data = CaptionedFolderDataModule(
            str(image_folder(Path(tmp) / "images", n_images, args.resolution)), image_size=args.resolution,
            batch_size=args.batch_size, val_fraction=0.0, hflip=False, check_images=False, num_workers=0,
            cache_latents=args.cache_latents, cache_text_embeddings=args.cache_latents,
            latent_cache_dir=str(Path(tmp) / "latent_cache"))
        meter = StepMeter()
        trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision=precision,
                            max_steps=args.steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[meter],
                            num_sanity_val_steps=0, default_root_dir=tmp)
        trainer.fit(module, datamodule=data)
    steps = meter.steps
    timed = steps[1:] if len(steps) > 1 else steps
    result: dict[str, Any] = {
        "model": args.model, "random_weights": True, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch_threads": torch.get_num_threads(), "resolution": args.resolution, "batch_size": args.batch_size,
        "rank": args.rank, "steps": len(steps), "trainer_precision": precision,
        "features": {"gradient_checkpointing": args.gradient_checkpointing, "cache_latents": args.cache_latents,
                     "frozen_precision": args.frozen_precision,
                     "frozen_dtype": str(module.vae.dtype).removeprefix("torch."),
                     "optimizer": type(trainer.optimizers[0]).__name__ + (
                         " (fused)" if trainer.optimizers[0].defaults.get("fused") else ""),
                     "optimizer_variant": args.optimizer_variant},
        "build_s": round(build_s, 1),
        "fit_start_s": round(meter.train_start - meter.fit_start, 1),
        "step_s": [round(s, 2) for s in steps],
        "s_per_step": round(sum(timed) / len(timed), 2) if timed else None,
        "trainable_params": sum(p.numel() for p in module.lora_parameters()),
        "trainable_params_by_rank": trainable_counts(model_dir, list(module.hparams.target_modules)),
        "rss_after_build_gib": round(rss_after_build / GIB, 2),
        "peak_rss_during_steps_gib": round(meter.rss_peak / GIB, 2),
        "peak_rss_process_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2),
    }
    if cuda:
        result["peak_cuda_memory_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    return result


def compare(argv: list[str]) -> None:
    """Run the benchmark as configured and then with each feature off in turn (one process each, so every peak
    is its own); print one table."""
    base = [a for a in argv if a != "--compare"]
    variants = {"all features": [], "no gradient checkpointing": ["--no-gradient-checkpointing"],
                "no cached latents": ["--no-cache-latents"], "fp32 frozen parts": ["--frozen-precision", "fp32"],
                "plain AdamW": ["--optimizer-variant", "adamw"]}
    rows = []
    for name, extra in variants.items():
        out = subprocess.run([sys.executable, __file__, *base, *extra, "--json-only"], capture_output=True,
                             text=True, env=os.environ.copy())
        if out.returncode != 0:
            rows.append((name, None, out.stderr.strip().splitlines()[-1:] or ["failed"]))
            continue
        rows.append((name, json.loads(out.stdout.strip().splitlines()[-1]), None))
    memory_key = "peak_cuda_memory_gib" if any(r and "peak_cuda_memory_gib" in r for _, r, _ in rows) else \
        "peak_rss_during_steps_gib"
    print(f"| variant | s/step | {memory_key} | fit start s |")
    print("|---|---|---|---|")
    for name, result, error in rows:
        if result is None:
            print(f"| {name} | failed: {error} | | |")
        else:
            print(f"| {name} | {result['s_per_step']} | {result.get(memory_key)} | {result['fit_start_s']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15_random", help="sd15_random (default), tiny, or a model dir/hub id")
    parser.add_argument("--dir", default=os.environ.get("ATELIER_OUTPUT_DIR", "outputs") + "/bench_sd_lora",
                        help="work folder (model configs, temporary images and cache)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="training steps (the first is reported apart)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--frozen-precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--optimizer-variant", choices=["auto", "adamw", "fused", "8bit"], default="auto")
    parser.add_argument("--precision", choices=["auto", "32-true", "bf16-mixed"], default="auto")
    parser.add_argument("--compare", action="store_true", help="also run with each feature off, print a table")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.dir).expanduser().mkdir(parents=True, exist_ok=True)
    if args.compare:
        compare(sys.argv[1:])
        return
    result = run(args)
    if args.json_only:
        print(json.dumps(result))
        return
    print(json.dumps(result, indent=2))
    print(f"{args.model} {args.resolution}px batch {args.batch_size} rank {args.rank}: {result['s_per_step']} s/step, "
          f"peak RSS {result['peak_rss_process_gib']} GiB (process), {result['peak_rss_during_steps_gib']} GiB "
          f"(steps), {result['trainable_params']:,} trainable parameters")


if __name__ == "__main__":
    main()
