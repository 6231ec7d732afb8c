"""Benchmark the Stable Diffusion paths on the tiny random-weight model: LoRA training steps/s and generation
images/s, with peak CUDA memory. The tiny model measures the framework's overhead and plumbing, not SD speed.

    python scripts/bench_text2image.py --dir /tmp/tiny_sd --device cuda --precision bf16 --train-steps 300 --images 64
    python scripts/bench_text2image.py --dir /tmp/tiny_sd --device cpu --precision fp32 --train-steps 5 --images 4
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from atelier.data.captioned_folder import CaptionedFolderDataModule
from atelier.models.sd_lora import StableDiffusionLoRA
from atelier.text2image.pipeline import load_text2image, set_sampler
from atelier.text2image.tiny import save_tiny_model

TRAINER_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


class _Timer(L.Callback):
    """Wall time of the training loop only (from the first to the last batch)."""

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if self.steps == 0:
            self._sync(trainer)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.steps += 1
        self._sync(trainer)
        self.end = time.perf_counter()

    @staticmethod
    def _sync(trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()


def image_folder(root: Path, n: int = 16, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the tiny model is built (or reused)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=sorted(TRAINER_PRECISION), default="fp32")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=64, help="images to generate")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps per image (NFE; x2 with CFG)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    model_dir = save_tiny_model(args.dir)
    results: dict[str, object] = {"device": torch.cuda.get_device_name() if cuda else "cpu",
                                  "precision": args.precision, "model": "tiny random-weight SD (32 px)"}

    with tempfile.TemporaryDirectory() as tmp:
        data = CaptionedFolderDataModule(str(image_folder(Path(tmp) / "", 16)), image_size=32,
                                         batch_size=args.batch_size, val_fraction=0.0, instance_prompt="a painting",
                                         check_images=False)
        module = StableDiffusionLoRA(str(model_dir), functools.partial(torch.optim.AdamW, lr=1e-4))
        timer = _Timer()
        trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1,
                            precision=TRAINER_PRECISION[args.precision], max_steps=args.train_steps,
                            limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                            default_root_dir=tmp)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(module, datamodule=data)
        seconds = timer.end - timer.start
        results["train"] = {"steps": timer.steps, "batch_size": args.batch_size, "seconds": round(seconds, 3),
                            "steps_per_s": round((timer.steps - 1) / seconds, 2) if timer.steps > 1 else None,
                            "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None}

    pipe = load_text2image(str(model_dir), args.device, args.precision)
    set_sampler(pipe, "dpmpp")
    prompts = ["a harbour at dawn"] * args.images
    pipe(prompts[:1], num_inference_steps=2, output_type="np")  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for first in range(0, args.images, args.batch_size):
        batch = prompts[first:first + args.batch_size]
        pipe(batch, num_inference_steps=args.steps, output_type="np",
             generator=[torch.Generator().manual_seed(first + i) for i in range(len(batch))])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    results["generate"] = {"images": args.images, "num_inference_steps": args.steps, "batch_size": args.batch_size,
                           "seconds": round(seconds, 3), "images_per_s": round(args.images / seconds, 2),
                           "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
