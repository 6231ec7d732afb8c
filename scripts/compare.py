"""Compare several checkpoints under one evaluation protocol in one table.

    python scripts/compare.py outputs/ddpm_mnist_cpu/.../last.ckpt outputs/gan_mnist_cpu/.../last.ckpt \\
        outputs/vae_mnist_cpu/.../last.ckpt --num-samples 2000

Columns: model, run, sampling-network parameters, train time (``fit_seconds`` from the run directory's
``metrics.json``), FID, KID, IS (classifier-based for feature_extractor mnist_classifier) or class coverage,
sampling seconds per image. Each checkpoint is sampled with its own defaults unless --sampler/--steps are given
(they apply to diffusion models only). The reference statistics are computed once (cache). Prints the protocol.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fid_vs_nfe import extractor_args, make_evaluator

from atelier.sampling.loop import autocast_kwargs
from atelier.tasks.evaluate import format_table, result_row, sampling_params
from atelier.tasks.sample import load_module
from atelier.utils.allocator import tune_cpu_allocator


def fit_seconds(ckpt: Path) -> float | None:
    """``fit_seconds`` of the run that wrote ``<run>/checkpoints/<ckpt>`` (``None`` when unknown)."""
    path = ckpt.resolve().parent.parent / "metrics.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("fit_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpts", nargs="+", help="checkpoints (same dataset)")
    parser.add_argument("--sampler", default=None, help="diffusion sampler for every DDPM (default: its own)")
    parser.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the model's)")
    parser.add_argument("--sampling-prior", choices=["gmm", "standard"], default=None,
                        help="VAE latent prior (default: the model's own)")
    extractor_args(parser)
    args = parser.parse_args()
    tune_cpu_allocator()  # large CPU tensors reuse freed memory; ATELIER_MALLOC_TUNING=0: glibc's default

    evaluator = make_evaluator(args, args.ckpts[0])
    rows = []
    for ckpt in map(Path, args.ckpts):
        model = load_module(ckpt).to(args.device)
        result = evaluator.evaluate(model, {"sampler": args.sampler, "num_inference_steps": args.steps,
                                            "sampling_prior": args.sampling_prior,
                                            **autocast_kwargs(model, args.autocast)})
        run = ckpt.resolve().parent.parent
        rows.append({"model": type(model).__name__, "run": f"{run.parent.parent.name}/{run.name}",
                     "params": f"{sampling_params(model) / 1e6:.2f} M", "train s": fit_seconds(ckpt),
                     "sampling": result["protocol"]["sampling"] or "defaults", **result_row(result)})
        print(f"{ckpt}: {result['metrics'].get('fid')}", flush=True)
    columns = [c for c in rows[0] if any(r.get(c) is not None for r in rows) and c not in ("features img/s",)]
    print(f"\n{format_table(rows, columns)}\n")
    print(f"protocol:\n{evaluator.protocol().describe()}")


if __name__ == "__main__":
    main()
