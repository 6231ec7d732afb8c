"""Autoguidance sweep for a DDPM: FID against the autoguidance weight w, one line per guide checkpoint.

    python scripts/autoguidance_sweep.py <run>/checkpoints/last.ckpt \\
        --guides <run>/checkpoints/step_0000500.ckpt,<run>/checkpoints/step_0001000.ckpt \\
        --scales 1,1.5,2,2.5 --num-samples 2000

Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", Eq. 2) extrapolates
the model's prediction away from a weaker guide's, ``D̂ = D_guide + w · (D_main − D_guide)``; the guide here is the
EMA network of an earlier checkpoint of the same run, so the guided model costs no extra training. Every row is
drawn with the same noise seed and scored under one protocol (the domain feature extractor by default; FID, KID,
precision and recall). ``w = 1`` is the unguided model (one row, whatever the guide). ``--intervals`` limits the
guidance to noise levels ``σ ∈ (σ_lo, σ_hi]`` (Kynkäänniemi et al. 2024, arXiv:2404.07724; ``DDPM.sample``'s
``guidance_interval``), one row per interval; the NFE column counts the guide's calls (steps + guided steps).
Conditional models get balanced labels (``i % num_classes``) or, with ``--label-distribution prior``, the
training split's class frequencies. Writes ``autoguidance_sweep.csv``, ``.json`` and ``.png`` into ``--out``.
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
    row_nfe,
    sampler_args,
    sweep_labels,
    write_table,
)
from omegaconf import OmegaConf

from atelier.models.ddpm_sampling import check_interval, guided_steps
from atelier.sampling.loop import autocast_kwargs
from atelier.tasks.evaluate import format_table, result_row
from atelier.tasks.sample import guide_kwargs, load_module
from atelier.utils.allocator import tune_cpu_allocator

COLUMNS = ["guide", "autoguidance_scale", "guidance_interval", "NFE", "fid", "kid", "precision", "recall", "s/image"]


def parse_intervals(spec: str) -> list[tuple[float, float] | None]:
    """``--intervals`` (``none,0.28:5.42,0.28:inf``) as guidance intervals ``(σ_lo, σ_hi)``, ``None`` for none.
    Exits with a message on a malformed entry."""
    out: list[tuple[float, float] | None] = []
    for item in spec.split(","):
        if item.strip().lower() in ("none", "all", ""):
            out.append(None)
            continue
        lo, sep, hi = item.partition(":")
        try:
            if not sep:
                raise ValueError("it is not <σ_lo>:<σ_hi> (e.g. 0.28:5.42) or none")
            out.append(check_interval((float(lo), float(hi))))
        except ValueError as err:
            raise SystemExit(f"--intervals entry {item!r}: {err}") from err
    return out


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Evaluate ``w = 1`` once and every other scale of ``args.scales`` with every guide; returns the table rows."""
    model = load_module(args.ckpt).to(args.device)
    resolve_sampler(args, model)
    evaluator = make_evaluator(args, args.ckpt)
    options: dict[str, Any] = {"sampler": args.sampler, "num_inference_steps": args.steps,
                               **autocast_kwargs(model, args.autocast)}
    labels = sweep_labels(args, model, evaluator)
    if labels is not None:
        options["labels"] = labels
    scales = [float(s) for s in args.scales.split(",")]
    intervals = parse_intervals(args.intervals)
    steps = row_nfe(args.sampler, args.steps)
    rows = []
    if 1.0 in scales:
        rows.append({"guide": None, "autoguidance_scale": 1.0, "guidance_interval": None, "NFE": steps,
                     **result_row(evaluator.evaluate(model, options))})
        print(f"unguided: fid={rows[-1]['fid']:.3f}", flush=True)
    for guide_path in args.guides.split(","):
        guide = guide_kwargs(model, OmegaConf.create({"guide_ckpt_path": guide_path}))["guide"]
        for w, interval in ((s, i) for s in scales if s != 1.0 for i in intervals):
            result = evaluator.evaluate(model, {**options, "guide": guide, "autoguidance_scale": w,
                                                "guidance_interval": interval})
            # every network call is guided without an interval (also edm_heun's 2N - 1); else the steps inside it
            nfe = 2 * steps if interval is None else steps + guided_steps(model, args.sampler, args.steps, interval)
            rows.append({"guide": guide_path, "autoguidance_scale": w, "guidance_interval": interval, "NFE": nfe,
                         **result_row(result)})
            print(f"guide={Path(guide_path).name} w={w} interval={interval}: fid={rows[-1]['fid']:.3f}", flush=True)
    protocol = record_labels(evaluator.protocol({k: v for k, v in options.items() if k != "labels"}).to_dict(),
                             args, labels)
    write_outputs(Path(args.out), rows, protocol, args)
    return rows


def write_outputs(out: Path, rows: list[dict[str, Any]], protocol: dict[str, Any], args: argparse.Namespace) -> None:
    """``autoguidance_sweep.csv``, ``.json`` and ``.png`` (FID against w, one line per guide) in ``out``."""
    write_table(out, "autoguidance_sweep", rows, COLUMNS, {"ckpt": str(args.ckpt), "protocol": protocol})
    unguided = [r for r in rows if r["guide"] is None]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for guide, interval in dict.fromkeys((r["guide"], r["guidance_interval"]) for r in rows if r["guide"] is not None):
        line = unguided + [r for r in rows if (r["guide"], r["guidance_interval"]) == (guide, interval)]
        line.sort(key=lambda r: r["autoguidance_scale"])
        label = Path(guide).stem + ("" if interval is None else f", σ ∈ ({interval[0]:g}, {interval[1]:g}]")
        ax.plot([r["autoguidance_scale"] for r in line], [r["fid"] for r in line], "o-", label=label)
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
    parser.add_argument("--intervals", default="none",
                        help="comma-separated guidance intervals σ_lo:σ_hi (Kynkäänniemi et al. 2024; inf allowed) "
                             "or none (every step), each tried with every guide and w > 1")
    sampler_args(parser, "sampler steps (two network calls each with a guide)")
    parser.add_argument("--out", default="outputs/autoguidance_sweep", help="folder for the CSV, JSON and PNG")
    extractor_args(parser)
    label_args(parser)
    args = parser.parse_args(argv)
    tune_cpu_allocator()  # large CPU tensors reuse freed memory; ATELIER_MALLOC_TUNING=0: glibc's default
    rows = sweep(args)
    print(f"\nAutoguidance sweep for {args.ckpt}\n\n{format_table(rows, COLUMNS)}\n\nwritten to {args.out}")
    return rows


if __name__ == "__main__":
    main()
