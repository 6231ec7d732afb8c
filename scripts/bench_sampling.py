"""Seconds for N samples from the quick DDPM (or a checkpoint) per sampler, NFE, precision and batch size: the
issue-14 bar "1,000 samples in <= 60 s on a 2-core CPU".

    python scripts/bench_sampling.py                                   # the ddpm_mnist_cpu UNet, random weights
    python scripts/bench_sampling.py --ckpt outputs/.../last.ckpt --n 1000 --nfe 10 25
    python scripts/bench_sampling.py --batch-sizes 250 1000 --channels-last

Speed does not depend on the weights, so without ``--ckpt`` the network is the quick recipe's (32/64/64
channels, 28 px, no attention) with random weights; its images are not shown or scored. Prints, per row, the
total seconds, seconds per NFE and images/s, and "bar" where N = 1,000 takes <= 60 s. ``fp32`` runs the network
in fp32; ``bf16`` under bf16 autocast (``DDPM.sample(autocast=True)``, which is fp32 on a CPU without AMX:
:func:`atelier.sampling.loop.sampling_autocast_dtype`), the scheduler staying fp32 in both.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from atelier.models.ddpm import DDPM  # noqa: E402
from atelier.nets.unet import build_unet  # noqa: E402
from atelier.sampling.loop import sampling_autocast_dtype  # noqa: E402
from atelier.tasks.sample import load_module  # noqa: E402
from atelier.utils.allocator import tune_cpu_allocator  # noqa: E402
from atelier.utils.precision import cpu_flags  # noqa: E402


def quick_ddpm() -> DDPM:
    """The ``ddpm_mnist_cpu`` network and schedule with random weights."""
    torch.manual_seed(0)
    net = build_unet(28, 1, block_out_channels=(32, 64, 64), layers_per_block=1, attention_resolutions=(),
                     norm_num_groups=32)
    return DDPM(net, functools.partial(torch.optim.AdamW, lr=1e-3), beta_schedule="squaredcos_cap_v2",
                prediction_type="v_prediction", sampler="dpmpp_sde", num_inference_steps=25)


def time_row(model: DDPM, n: int, sampler: str, nfe: int, batch_size: int, autocast: bool) -> float:
    """Wall seconds of ``model.sample(n, ...)`` (after a 2-image warm-up call with the same settings)."""
    model.sample(2, generator=torch.Generator().manual_seed(1), sampler=sampler, num_inference_steps=2,
                 batch_size=batch_size, autocast=autocast)
    start = time.perf_counter()
    model.sample(n, generator=torch.Generator().manual_seed(0), sampler=sampler, num_inference_steps=nfe,
                 batch_size=batch_size, autocast=autocast)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None, help="a DDPM checkpoint (default: the quick UNet, random weights)")
    parser.add_argument("--n", type=int, default=1000, help="samples per row")
    parser.add_argument("--sampler", default="dpmpp_sde")
    parser.add_argument("--nfe", type=int, nargs="+", default=[25])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[250])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--channels-last", action="store_true", help="also time the network in channels_last")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    print(f"glibc malloc tuning (atelier.utils.allocator): {'on' if tune_cpu_allocator() else 'off'}", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = (load_module(args.ckpt) if args.ckpt else quick_ddpm()).eval()
    flags = cpu_flags()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU flags: "
          f"{' '.join(f for f in ('amx_bf16', 'avx512_bf16', 'avx512f', 'avx2') if f in flags) or '-'}; "
          f"bf16 autocast on this CPU: {sampling_autocast_dtype('cpu') is not None}", flush=True)
    layouts = [False, True] if args.channels_last else [False]
    rows: list[dict[str, object]] = []
    for channels_last in layouts:
        model.ema.module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for precision in args.precision:
            for batch_size in args.batch_sizes:
                for nfe in args.nfe:
                    sec = time_row(model, args.n, args.sampler, nfe, batch_size, precision == "bf16")
                    row = {"precision": precision, "channels_last": channels_last, "batch": batch_size,
                           "sampler": args.sampler, "NFE": nfe, "seconds": round(sec, 1),
                           "s/NFE": round(sec / nfe, 2), "images/s": round(args.n / sec, 1)}
                    rows.append(row)
                    bar = "  (<= 60 s per 1,000: bar met)" if sec * 1000 / args.n <= 60 else ""
                    print(f"{precision:4s} {'channels_last' if channels_last else 'contiguous':13s} batch "
                          f"{batch_size:4d} {args.sampler}-{nfe:<3d}: {args.n} samples in {sec:6.1f} s "
                          f"({sec / nfe:.2f} s/NFE, {args.n / sec:6.1f} images/s){bar}", flush=True)
    return rows


if __name__ == "__main__":
    main()
