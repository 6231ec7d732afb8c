"""Training and sampling throughput: Atelier (Lightning) vs a plain PyTorch loop, same UNet and batch, in fp32
and bf16 autocast.

    python scripts/bench_train.py                      # the ddpm_mnist_cpu network, batch 64, 28 px, both precisions
    python scripts/bench_train.py --steps 50 --batch-size 128 --channels 32 64 64
    python scripts/bench_train.py --precision 32-true  # fp32 only
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python scripts/bench_train.py --skip-sampling   # as if the CPU had no AMX

Prints the CPU's bf16 flags and what ``trainer=cpu`` would pick (:mod:`atelier.utils.precision`); per precision,
training images/s through Lightning (``precision=32-true`` / ``bf16-mixed``) and through a raw loop doing the same
work per step (diffusion loss under the same autocast, AdamW, gradient clipping, EMA update), their ratio, the
bf16 / fp32 ratios, and sampling seconds per image for DDPM-1000 (extrapolated from a shorter run, the cost per
step being constant), DDIM-50 and DPM-Solver++-25, with the network under bf16 autocast for ``bf16-mixed``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from atelier.data.mnist import MNISTDataModule  # noqa: E402
from atelier.models.ddpm import DDPM  # noqa: E402
from atelier.nets.unet import build_unet  # noqa: E402
from atelier.utils.allocator import tune_cpu_allocator  # noqa: E402
from atelier.utils.precision import BF16_MATRIX_FLAGS, BF16_VECTOR_FLAGS, cpu_flags, cpu_precision  # noqa: E402

PRECISIONS = ("32-true", "bf16-mixed")


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the CPU for ``bf16-mixed`` (what Lightning's precision plugin does), else nothing."""
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_model(args: argparse.Namespace, compile_net: bool = False) -> DDPM:
    torch.manual_seed(0)
    net = build_unet(args.image_size, 1, block_out_channels=args.channels, layers_per_block=args.layers,
                     attention_resolutions=(), norm_num_groups=min(32, min(args.channels)))
    return DDPM(net, functools.partial(torch.optim.AdamW, lr=1e-3), beta_schedule="squaredcos_cap_v2",
                min_snr_gamma=5.0, compile=compile_net)


class StepTimer(L.Callback):
    """Wall time of the steps after ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def lightning_images_per_s(loader: DataLoader, args: argparse.Namespace, precision: str,
                           compile_net: bool = False) -> float:
    model = make_model(args, compile_net)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=args.warmup + args.steps,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(model, train_dataloaders=loader)
    return args.steps * args.batch_size / (timer.end - timer.start)


def raw_images_per_s(loader: DataLoader, args: argparse.Namespace, precision: str,
                     compile_net: bool = False) -> float:
    model = make_model(args, compile_net)
    model.configure_model()  # what Lightning calls: compiles the network when compile_net
    model.train()
    opt = torch.optim.AdamW(model.net.parameters(), lr=1e-3)
    it = iter(loader)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            start = time.perf_counter()
        x0 = next(it)[0]
        with autocast(precision):
            loss = model.diffusion_loss(x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.net.parameters(), 1.0)
        opt.step()
        model.ema.update_parameters(model.net)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def sampling_seconds_per_image(args: argparse.Namespace, precision: str) -> dict[str, float]:
    model = make_model(args)
    n = args.sample_n
    out = {}
    for name, sampler, steps, scale in (("DDPM-1000 (from 100 steps)", "ddpm", 100, 10.0),
                                        ("DDIM-50", "ddim", 50, 1.0), ("DPM-Solver++-25", "dpmpp", 25, 1.0)):
        start = time.perf_counter()
        with autocast(precision):  # the scheduler's arithmetic stays fp32 (atelier.sampling.loop)
            model.sample(n, generator=torch.Generator().manual_seed(0), sampler=sampler, num_inference_steps=steps)
        out[name] = (time.perf_counter() - start) * scale / n
    return out


def cpu_line() -> str:
    """The CPU model, its bf16 flags and what ``trainer=cpu`` picks on it."""
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")), "?")
    flags = cpu_flags()
    found = [f for f in (*BF16_MATRIX_FLAGS, *BF16_VECTOR_FLAGS, "amx_tile", "avx512f", "avx2") if f in flags]
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"CPU {model}; flags {' '.join(found) or '(none of interest)'}"
            f"{f'; ONEDNN_MAX_CPU_ISA={isa}' if isa else ''}; trainer=cpu picks {cpu_precision(flags)}")


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--sample-n", type=int, default=64)
    parser.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                        help="Lightning precisions to time (default: both)")
    parser.add_argument("--repeats", type=int, default=2, help="plain-loop runs per precision (best is used)")
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="also time the network under torch.compile (model.compile=true); compile time excluded, "
                             "so raise --warmup above the steps that recompile (default 5 is enough for one shape)")
    parser.add_argument("--data-dir", default=os.environ.get("ATELIER_DATA_DIR", str(ROOT / "data")))
    args = parser.parse_args()
    print(f"glibc malloc tuning (atelier.utils.allocator): {'on' if tune_cpu_allocator() else 'off'}", flush=True)

    dm = MNISTDataModule(args.data_dir, image_size=args.image_size, download=False)
    dm.setup()
    n = (args.warmup + args.steps) * args.batch_size
    x = torch.stack([dm.train_set[i][0] for i in range(n)])
    dataset = TensorDataset(x, torch.zeros(n, dtype=torch.long))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, drop_last=True)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, UNet {args.channels} x{args.layers}, "
          f"{args.image_size} px, batch {args.batch_size}, {args.steps} timed steps")
    print(cpu_line(), flush=True)
    results: dict[str, dict[str, float]] = {}
    for precision in args.precision:
        raws = [raw_images_per_s(loader, args, precision) for _ in range(max(1, args.repeats))]
        lit = lightning_images_per_s(loader, args, precision)
        raw_best = max(raws)
        results[precision] = {"raw": raw_best, "lightning": lit}
        print(f"[{precision}] plain PyTorch loop : {' / '.join(f'{r:.1f}' for r in raws)} images/s")
        print(f"[{precision}] Atelier (Lightning): {lit:8.1f} images/s")
        overhead = 100 * (1 - lit / raw_best)
        print(f"[{precision}] Lightning / plain  : {lit / raw_best:8.3f}  (overhead {overhead:+.1f}%)", flush=True)
        if args.compile:
            raw_c = raw_images_per_s(loader, args, precision, compile_net=True)
            lit_c = lightning_images_per_s(loader, args, precision, compile_net=True)
            results[precision].update(raw_compiled=raw_c, lightning_compiled=lit_c)
            print(f"[{precision}] torch.compile      : plain loop {raw_c:.1f} images/s ({raw_c / raw_best:.2f}x), "
                  f"Lightning (model.compile=true) {lit_c:.1f} images/s ({lit_c / lit:.2f}x)", flush=True)
    if set(PRECISIONS) <= set(results):
        fp32, bf16 = results["32-true"], results["bf16-mixed"]
        print(f"bf16 / fp32 training: Lightning {bf16['lightning'] / fp32['lightning']:.2f}x "
              f"({fp32['lightning']:.1f} -> {bf16['lightning']:.1f} images/s), plain loop "
              f"{bf16['raw'] / fp32['raw']:.2f}x ({fp32['raw']:.1f} -> {bf16['raw']:.1f} images/s)")
    if not args.skip_sampling:
        for precision in args.precision:
            for name, sec in sampling_seconds_per_image(args, precision).items():
                print(f"[{precision}] sampling {name:28s}: {sec:.4f} s/image", flush=True)


if __name__ == "__main__":
    main()
