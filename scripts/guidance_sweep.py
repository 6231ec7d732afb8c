"""Classifier-free guidance sweep for a class-conditional DDPM: FID and conditional accuracy per guidance scale.

    python scripts/guidance_sweep.py outputs/ddpm_cond_mnist_cpu/<date>/<time>/checkpoints/last.ckpt \\
        --scales 0,1,2,3,5 --num-samples 1000 --baseline outputs/ddpm_mnist_cpu/<date>/<time>/checkpoints/last.ckpt

For each guidance scale w (ε̂ = ε_u + w·(ε_c − ε_u), Ho & Salimans 2022) it draws ``--num-samples`` images with
balanced labels (``i % num_classes``; ``--label-distribution prior``: the training split's class frequencies)
and the same noise seed, and measures, under one pinned protocol (the
domain feature extractor by default): FID, KID, the class coverage of the predicted labels, and the *conditional
accuracy*, the fraction of samples that the domain classifier assigns to the class asked for. ``--baseline``
adds an unconditional checkpoint's row under the same protocol, the reference for the quality bar
"FID no worse than twice the unconditional model's". Writes ``guidance_sweep.csv``, ``guidance_sweep.png``
(FID and conditional accuracy against w) and ``guidance_sweep.json`` (rows and protocol) into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from fid_vs_nfe import (
    extractor_args,
    label_args,
    make_evaluator,
    record_labels,
    resolve_sampler,
    sampler_args,
    sweep_labels,
    write_table,
)

from atelier.sampling.loop import autocast_kwargs
from atelier.tasks.evaluate import format_table, result_row
from atelier.tasks.sample import load_module
from atelier.utils.allocator import tune_cpu_allocator

COLUMNS = ["model", "guidance_scale", "fid", "kid", "cond_accuracy", "class_coverage", "s/image"]


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Evaluate every scale of ``args.scales`` (and ``args.baseline``); returns the table rows."""
    model = load_module(args.ckpt).to(args.device)
    if getattr(model, "num_classes", None) is None:
        raise SystemExit(f"{args.ckpt} is not a class-conditional model (model.num_classes is null)")
    resolve_sampler(args, model)
    evaluator = make_evaluator(args, args.ckpt)
    labels = sweep_labels(args, model, evaluator)
    options: dict[str, Any] = {"sampler": args.sampler, "num_inference_steps": args.steps,
                               **autocast_kwargs(model, args.autocast)}
    rows = []
    for w in (float(s) for s in args.scales.split(",")):
        result = evaluator.evaluate(model, {**options, "labels": labels, "guidance_scale": w})
        rows.append({"model": "conditional", "guidance_scale": w, **result_row(result)})
        print(f"w={w}: fid={rows[-1]['fid']:.3f} cond_accuracy={rows[-1]['cond_accuracy']:.4f}", flush=True)
    if args.baseline:
        baseline = load_module(args.baseline).to(args.device)
        result = evaluator.evaluate(baseline, options)
        rows.append({"model": "unconditional baseline", "guidance_scale": None, **result_row(result)})
        print(f"baseline: fid={rows[-1]['fid']:.3f}", flush=True)
    protocol = record_labels(evaluator.protocol(options).to_dict(), args, labels)
    write_outputs(Path(args.out), rows, protocol, args)
    return rows


def write_outputs(out: Path, rows: list[dict[str, Any]], protocol: dict[str, Any], args: argparse.Namespace) -> None:
    """``guidance_sweep.csv``, ``.json`` and ``.png`` (FID and conditional accuracy against the scale) in ``out``."""
    write_table(out, "guidance_sweep", rows, COLUMNS,
                {"ckpt": str(args.ckpt), "baseline": args.baseline, "protocol": protocol})
    cond = [r for r in rows if r["guidance_scale"] is not None]
    scales = [r["guidance_scale"] for r in cond]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(scales, [r["fid"] for r in cond], "o-", color="tab:blue", label="FID")
    base = [r for r in rows if r["guidance_scale"] is None]
    if base:
        ax.axhline(base[0]["fid"], color="tab:blue", ls=":", label="FID, unconditional model")
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel(f"FID ({protocol['extractor']}, {protocol['num_samples']} samples)", color="tab:blue")
    acc = ax.twinx()
    acc.plot(scales, [100 * r["cond_accuracy"] for r in cond], "s--", color="tab:red", label="cond. accuracy")
    acc.set_ylabel("conditional accuracy (%)", color="tab:red")
    lines = ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
    ax.legend(lines, [str(h.get_label()) for h in lines], fontsize=7, loc="center right")
    ax.set_title(f"classifier-free guidance, {args.sampler} {args.steps} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "guidance_sweep.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a class-conditional DDPM checkpoint")
    parser.add_argument("--scales", default="0,1,2,3,5", help="comma-separated guidance scales w")
    sampler_args(parser, "sampler steps (NFE per image, ×2 with guidance)")
    parser.add_argument("--baseline", default=None,
                        help="an unconditional checkpoint evaluated under the same protocol")
    parser.add_argument("--out", default="outputs/guidance_sweep", help="folder for the CSV, JSON and PNG")
    extractor_args(parser)
    label_args(parser)
    args = parser.parse_args(argv)
    tune_cpu_allocator()  # large CPU tensors reuse freed memory; ATELIER_MALLOC_TUNING=0: glibc's default
    rows = sweep(args)
    print(f"\nGuidance sweep for {args.ckpt}\n\n{format_table(rows, COLUMNS)}\n\nwritten to {args.out}")
    return rows


if __name__ == "__main__":
    main()
