"""Kynkäänniemi et al. 2023's control for one checkpoint: FID of a random vs a class-histogram-matched subset.

    python scripts/histogram_control.py <run>/checkpoints/last.ckpt --feature-extractor art_classifier \\
        --reference-image-size 32 --sample-image-size 32 --num-samples 2000 --pool 10000 \\
        --label-distribution prior --metrics fid,kid,precision,recall

Draws ``--pool`` samples (the model's own sampler and steps unless given), clusters the reference images in the
extractor's feature space (``--clusters`` k-means classes), and scores two subsets of ``--num-samples`` through
the same protocol as ``evaluate.py``: a uniform draw (the control) and one whose cluster histogram follows the
reference's (:mod:`atelier.metrics.histogram_match`). The drop from the first to the second is what getting the
mix of content right is worth on that yardstick; when one model beats another by more than that, its images are
better, not only its histogram. Prints a table and the protocol; ``--out`` also writes the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from fid_vs_nfe import extractor_args, label_args, make_evaluator

from atelier.metrics.evaluator import sample_batches
from atelier.metrics.histogram_match import histogram_control
from atelier.sampling.interface import accepted_kwargs
from atelier.sampling.loop import autocast_kwargs
from atelier.tasks.evaluate import evaluation_labels, format_table
from atelier.tasks.sample import load_module
from atelier.utils.allocator import tune_cpu_allocator

COLUMNS = ["subset", "fid", "kid", "kid_std", "precision", "recall"]


def draw_pool(model: torch.nn.Module, size: int, batch_size: int, seed: int, labels: torch.Tensor | None,
              options: dict) -> torch.Tensor:
    """``(size, C, H, W)`` float samples of ``model`` in ``[-1, 1]`` on the CPU, drawn in batches from one seeded
    generator (:func:`atelier.metrics.evaluator.sample_batches`); ``labels`` ``(size,)`` int64 for a
    class-conditional model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        batches = sample_batches(model, size, batch_size, generator, labels, accepted_kwargs(model, options))
        return torch.cat([images.float().clamp(-1, 1).cpu() for images, _, _ in batches])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="checkpoint of any generative family")
    parser.add_argument("--pool", type=int, default=10000, help="samples drawn; the subsets are taken from them")
    parser.add_argument("--clusters", type=int, default=30, help="k-means classes of the reference features")
    parser.add_argument("--sampler", default=None, help="diffusion sampler (default: the model's own)")
    parser.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the model's own)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    extractor_args(parser)
    label_args(parser)
    args = parser.parse_args()
    tune_cpu_allocator()  # large CPU tensors reuse freed memory; ATELIER_MALLOC_TUNING=0: glibc's default
    if args.pool < args.num_samples:
        raise SystemExit(f"--pool={args.pool} must be at least --num-samples={args.num_samples}")

    evaluator = make_evaluator(args, args.ckpt)
    model = load_module(args.ckpt).to(args.device).eval()
    classes = getattr(model, "num_classes", None)
    labels = (evaluation_labels(args.label_distribution, args.pool, classes, evaluator.datamodule)
              if isinstance(classes, int) else None)
    options = {"sampler": args.sampler, "num_inference_steps": args.steps, **autocast_kwargs(model, args.autocast)}
    pool = draw_pool(model, args.pool, args.batch_size, args.seed + 1, labels, options)
    result = histogram_control(evaluator, pool, args.clusters, args.seed)
    rows = [{"subset": name, **{k: result[name].get(k) for k in COLUMNS[1:]}} for name in ("random", "matched")]
    print(f"\n{format_table(rows, [c for c in COLUMNS if any(r.get(c) is not None for r in rows)])}\n")
    print(f"k-means classes: {args.clusters}; pool: {args.pool}; images the pool lacked in under-drawn classes "
          f"(filled at random): {result['shortfall']}")
    print(f"protocol:\n{evaluator.protocol().describe()}")
    if args.out:
        sampling = dict(accepted_kwargs(model, options, warn=False))
        if labels is not None:
            sampling["label_distribution"] = args.label_distribution
        record = {"ckpt": args.ckpt, "protocol": evaluator.protocol(sampling).to_dict(), **result}
        Path(args.out).write_text(json.dumps(record, indent=1, default=float))


if __name__ == "__main__":
    main()
