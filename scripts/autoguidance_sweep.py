"""Autoguidance sweep for a DDPM: FID against the autoguidance weight w, one line per guide checkpoint.

    python scripts/autoguidance_sweep.py <run>/checkpoints/last.ckpt \\
        --guides <run>/checkpoints/step_0000500.ckpt,<run>/checkpoints/step_0001000.ckpt \\
        --scales 1,1.5,2,2.5 --num-samples 2000

Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", Eq. 2) extrapolates
the model's prediction away from a weaker guide's, ``D̂ = D_guide + w · (D_main − D_guide)``; the guide here is the
EMA network of an earlier checkpoint of the same run, so the guided model costs no extra training. Every row is
drawn with the same noise seed and scored under one protocol (the domain feature extractor by default; FID, KID,
precision and recall). ``w = 1`` is the unguided model (one row, whatever the guide). Conditional models get
balanced labels (``i % num_classes``). Writes ``autoguidance_sweep.csv``, ``.json`` and ``.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from fid_vs_nfe import extractor_args, make_evaluator, resolve_sampler, sampler_args, write_table
from omegaconf import OmegaConf

from atelier.sampling.loop import autocast_kwargs
from atelier.tasks.evaluate import format_table, result_row
from atelier.tasks.sample import guide_kwargs, load_module

COLUMNS = ["guide", "autoguidance_scale", "fid", "kid", "precision", "recall", "s/image"]


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Evaluate ``w = 1`` once and every other scale of ``args.scales`` with every guide; returns the table rows."""
    model = load_module(args.ckpt).to(args.device)
    resolve_sampler(args, model)
    evaluator = make_evaluator(args, args.ckpt)
    options: dict[str, Any] = {"sampler": args.sampler, "num_inference_steps": args.steps,
                               **autocast_kwargs(model, args.autocast)}
    classes = getattr(model, "num_classes", None)
    if isinstance(classes, int):
        options["labels"] = torch.arange(args.num_samples) % classes
    scales = [float(s) for s in args.scales.split(",")]
    rows = []
    if 1.0 in scales:
        rows.append({"guide": None, "autoguidance_scale": 1.0, **result_row(evaluator.evaluate(model, options))})
        print(f"unguided: fid={rows[-1]['fid']:.3f}", flush=True)
    for guide_path in args.guides.split(","):
        guide = guide_kwargs(model, OmegaConf.create({"guide_ckpt_path": guide_path}))["guide"]
        for w in (s for s in scales if s != 1.0):
            result = evaluator.evaluate(model, {**options, "guide": guide, "autoguidance_scale": w})
            rows.append({"guide": guide_path, "autoguidance_scale": w, **result_row(result)})
            print(f"guide={Path(guide_path).name} w={w}: fid={rows[-1]['fid']:.3f}", flush=True)
    protocol = evaluator.protocol({k: v for k, v in options.items() if k != "labels"}).to_dict()
    write_outputs(Path(args.out), rows, protocol, args)
    return rows


def write_outputs(out: Path, rows: list[dict[str, Any]], protocol: dict[str, Any], args: argparse.Namespace) -> None:
    """``autoguidance_sweep.csv``, ``.json`` and ``.png`` (FID against w, one line per guide) in ``out``."""
    write_table(out, "autoguidance_sweep", rows, COLUMNS, {"ckpt": str(args.ckpt), "protocol": protocol})
    unguided = [r for r in rows if r["guide"] is None]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for guide in dict.fromkeys(r["guide"] for r in rows if r["guide"] is not None):
        line = unguided + [r for r in rows if r["guide"] == guide]
        line.sort(key=lambda r: r["autoguidance_scale"])
        ax.plot([r["autoguidance_scale"] for r in line], [r["fid"] for r in line], "o-", label=Path(guide).stem)
    ax.set_xlabel("autoguidance weight w (1: unguided)")
    ax.set_ylabel(f"FID ({protocol['extractor']}, {protocol['num_samples']} samples)")
    ax.legend(title="guide", fontsize=7)
    ax.set_title(f"autoguidance, {args.sampler} {args.steps} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "autoguidance_sweep.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a DDPM checkpoint (the main model)")
    parser.add_argument("--guides", required=True, help="comma-separated guide checkpoints of the same model")
    parser.add_argument("--scales", default="1,1.5,2,2.5", help="comma-separated autoguidance weights w")
    sampler_args(parser, "sampler steps (two network calls each with a guide)")
    parser.add_argument("--out", default="outputs/autoguidance_sweep", help="folder for the CSV, JSON and PNG")
    extractor_args(parser)
    args = parser.parse_args(argv)
    rows = sweep(args)
    print(f"\nAutoguidance sweep for {args.ckpt}\n\n{format_table(rows, COLUMNS)}\n\nwritten to {args.out}")
    return rows


if __name__ == "__main__":
    main()
