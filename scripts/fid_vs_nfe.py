"""FID-vs-NFE table and plot for one DDPM checkpoint: the same protocol and noise seed for every sampler row.

    python scripts/fid_vs_nfe.py outputs/ddpm_mnist_cpu/<date>/<time>/checkpoints/last.ckpt --num-samples 1000
    python scripts/fid_vs_nfe.py CKPT --samplers dpmpp,dpmpp_sde,unipc,euler_a --nfe 10,25,50,100
    python scripts/fid_vs_nfe.py CKPT --rows ddpm-1000,ddim-50,dpmpp-10      # explicit <sampler>-<steps> rows
    python scripts/fid_vs_nfe.py EDM_CKPT --rows edm_dpmpp-25,edm_heun-13 --ema-sigma-rel 0.1   # an EDM run

Rows are every ``--samplers`` × ``--nfe`` pair (default: all samplers of
:data:`atelier.sampling.schedulers.SAMPLERS` at 10, 25, 50 and 100 NFE; each sampler costs one network evaluation
per step, so NFE = steps) or the explicit ``--rows``. All of them cost 9 × 185 = 1,665 NFE per image: about 3 h
for 1,000 MNIST samples on a 2-core CPU (~7 ms per image and NFE), minutes on a GPU, so lower --num-samples or
pick samplers for quick looks. Writes ``fid_vs_nfe.csv``, ``fid_vs_nfe.json`` (rows and protocol) and
``fid_vs_nfe.png`` (FID against NFE, one line per sampler, log-scaled NFE) into ``--out``, and prints the table
and the protocol. A checkpoint trained with ``model.parameterization=edm`` takes the samplers of
:data:`atelier.sampling.edm.EDM_SAMPLERS` (``edm_heun`` costs 2 × steps − 1 NFE; the NFE column counts that), and
``--ema-sigma-rel`` samples with a post-hoc EMA of that length (runs trained with ``callbacks/posthoc_ema``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from atelier.metrics.evaluator import Evaluator
from atelier.sampling.edm import EDM_SAMPLERS, edm_expected_nfe
from atelier.sampling.loop import autocast_kwargs
from atelier.sampling.schedulers import SAMPLERS, expected_nfe
from atelier.tasks.evaluate import LABEL_CHOICES, evaluation_labels, format_table, reference_datamodule, result_row
from atelier.tasks.sample import load_module
from atelier.utils.allocator import tune_cpu_allocator

DEFAULT_SAMPLERS = ",".join(SAMPLERS)
DEFAULT_NFE = "10,25,50,100"
COLUMNS = ["sampler", "NFE", "fid", "kid", "kid_std", "is", "is_std", "class_coverage", "class_entropy", "s/image",
           "features img/s"]
ALL_SAMPLERS = {**SAMPLERS, **EDM_SAMPLERS}


def row_nfe(sampler: str, steps: int) -> int:
    """Network evaluations per image of ``steps`` steps of ``sampler`` (DDPM or EDM family)."""
    return edm_expected_nfe(sampler, steps) if sampler in EDM_SAMPLERS else expected_nfe(sampler, steps)


def extractor_args(parser: argparse.ArgumentParser) -> None:
    """Options shared with scripts/compare.py: extractor, reference and sample counts."""
    parser.add_argument("--feature-extractor", default="mnist_classifier",
                        choices=["mnist_classifier", "art_classifier", "art_simclr", "inception"])
    parser.add_argument("--classifier-ckpt", default=None,
                        help="domain network (default: $ATELIER_<NAME> of --feature-extractor, e.g. "
                             "$ATELIER_ART_CLASSIFIER, else "
                             "the pinned weights, atelier.metrics.pinned)")
    parser.add_argument("--reference-image-size", type=int, default=None,
                        help="reference images at this size (px), default: the checkpoint's data.image_size")
    parser.add_argument("--sample-image-size", type=int, default=None,
                        help="resize generated images to this size (px) first: with --reference-image-size at the "
                             "same value, models drawn at different sizes are scored at one resolution")
    parser.add_argument("--inception-weights", default=None, help="Inception weights file (default: torch hub)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--reference-split", default=None, help="train | val | test (default: test if present)")
    parser.add_argument("--data-dir", default=None,
                        help="data folder of the reference images (default: the one stored in the checkpoint)")
    parser.add_argument("--reference-size", type=int, default=None, help="default: the whole split")
    parser.add_argument("--metrics", default="fid,kid,is")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.path.join(os.environ.get("ATELIER_OUTPUT_DIR", "outputs"),
                                                            "reference_stats"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=True,
                        help="DDPMs: the network under bf16 autocast where that pays (CPU with AMX, CUDA with bf16), "
                             "as sample.py / evaluate.py autocast=true; --no-autocast: fp32")


def label_args(parser: argparse.ArgumentParser) -> None:
    """``--label-distribution`` of the scripts that sample class-conditional models (as ``evaluate.py``'s key)."""
    parser.add_argument("--label-distribution", default="balanced", choices=LABEL_CHOICES,
                        help="class-conditional models: balanced labels (i %% K) or the training split's class "
                             "frequencies (prior: samples of p(x), comparable with unconditional models)")


def sweep_labels(args: argparse.Namespace, model: Any, evaluator: Evaluator) -> torch.Tensor | None:
    """``(args.num_samples,)`` int64 labels for a class-conditional ``model`` by ``args.label_distribution``
    (:func:`atelier.tasks.evaluate.evaluation_labels`, from the evaluator's datamodule), ``None`` for an
    unconditional one."""
    classes = getattr(model, "num_classes", None)
    if not isinstance(classes, int):
        return None
    return evaluation_labels(args.label_distribution, args.num_samples, classes, evaluator.datamodule)


def record_labels(protocol: dict[str, Any], args: argparse.Namespace, labels: torch.Tensor | None) -> dict[str, Any]:
    """``protocol`` (an ``EvalProtocol.to_dict()``) with ``sampling.label_distribution`` set when ``labels`` were
    drawn (class-conditional models)."""
    if labels is not None:
        protocol["sampling"]["label_distribution"] = args.label_distribution
    return protocol


def sampler_args(parser: argparse.ArgumentParser, steps_help: str) -> None:
    """``--sampler`` and ``--steps`` of the sweep scripts (both default to the model's own, see
    :func:`resolve_sampler`)."""
    parser.add_argument("--sampler", default=None,
                        help="a name of atelier.sampling.schedulers.SAMPLERS (default: the model's own)")
    parser.add_argument("--steps", type=int, default=None, help=f"{steps_help}; default: the model's own")


def resolve_sampler(args: argparse.Namespace, model: Any) -> None:
    """Fill ``args.sampler`` / ``args.steps`` from ``model.hparams`` where not given, so they are recorded resolved
    (the quick recipes sample with ``dpmpp_sde``)."""
    args.sampler = args.sampler or model.hparams.sampler
    args.steps = args.steps or model.hparams.num_inference_steps


def make_evaluator(args: argparse.Namespace, ckpt: str) -> Evaluator:
    extractor: dict[str, object] = {"name": args.feature_extractor}
    if args.feature_extractor == "inception":
        extractor["weights_path"] = args.inception_weights
    else:
        env = f"ATELIER_{args.feature_extractor.upper()}"
        extractor["ckpt_path"] = args.classifier_ckpt or os.environ.get(env)  # None: the pinned weights
    datamodule = reference_datamodule(ckpt, getattr(args, "data_dir", None), image_size=args.reference_image_size)
    return Evaluator(extractor, datamodule, args.metrics.split(","), args.num_samples,
                     args.reference_split, args.reference_size, args.cache_dir, batch_size=args.batch_size,
                     seed=args.seed, device=args.device, sample_image_size=args.sample_image_size)


def _check_names(names: list[str]) -> None:
    unknown = sorted({n for n in names if n not in ALL_SAMPLERS})
    if unknown:
        raise SystemExit(f"unknown sampler(s) {unknown}; allowed values: {sorted(ALL_SAMPLERS)}")


def parse_rows(args: argparse.Namespace) -> list[tuple[str, int]]:
    """``(sampler, steps)`` pairs from ``--rows`` (``<sampler>-<steps>``, comma-separated) or else from
    ``--samplers`` × ``--nfe``. Exits with a message for a malformed row, an unknown sampler (listing the allowed
    names) or a step count below 1."""
    if args.rows:
        pairs = []
        for spec in args.rows.split(","):
            sampler, _, steps = spec.strip().rpartition("-")
            if not sampler or not steps.isdigit():
                raise SystemExit(f"--rows entry {spec!r} is not <sampler>-<steps> (e.g. ddim-50)")
            pairs.append((sampler, int(steps)))
    else:
        samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
        try:
            nfes = [int(n) for n in args.nfe.split(",") if n.strip()]
        except ValueError as err:
            raise SystemExit(f"--nfe {args.nfe!r} must be comma-separated integers (e.g. {DEFAULT_NFE})") from err
        pairs = [(s, n) for s in samplers for n in nfes]
    _check_names([s for s, _ in pairs])
    if not pairs or any(n < 1 for _, n in pairs):
        raise SystemExit("every row needs at least 1 step")
    return pairs


def write_table(out: Path, stem: str, rows: list[dict[str, Any]], columns: list[str], record: dict[str, Any]) -> None:
    """``<stem>.csv`` (``columns`` of ``rows``) and ``<stem>.json`` (``record`` with the full ``rows``) in ``out``;
    shared by the sweep scripts."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.json").write_text(json.dumps({**record, "rows": rows}, indent=2))


def write_outputs(out: Path, rows: list[dict[str, Any]], protocol: dict[str, Any], ckpt: str) -> None:
    """``fid_vs_nfe.csv``, ``.json`` and ``.png`` (FID against NFE, one line per sampler) in ``out``."""
    write_table(out, "fid_vs_nfe", rows, COLUMNS, {"ckpt": ckpt, "protocol": protocol})
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = sorted((r for r in rows if r["sampler"] == sampler and r.get("fid") is not None),
                      key=lambda r: r["NFE"])
        if mine:
            spec = ALL_SAMPLERS[sampler]
            style = "--" if spec.stochastic else "-"
            ax.plot([r["NFE"] for r in mine], [r["fid"] for r in mine], style, marker="o", ms=3, label=sampler)
    finish_nfe_plot(fig, ax, rows, f"FID ({protocol.get('extractor')}, {protocol.get('num_samples')} samples)",
                    f"FID vs NFE: {Path(ckpt).name} (dashed: stochastic samplers)", out / "fid_vs_nfe.png", ncol=2)


def finish_nfe_plot(fig: Any, ax: Any, rows: list[dict[str, Any]], ylabel: str, title: str, path: Path,
                    ncol: int = 1, legend_outside: bool = False) -> None:
    """Log-scaled NFE axis ticked at the rows' NFEs, labels, grid and legend (right of the axes with
    ``legend_outside``); saves ``fig`` to ``path`` and closes it. Shared with scripts/merge_seeds.py."""
    ax.set_xscale("log")
    nfes = sorted({r["NFE"] for r in rows})
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.minorticks_off()
    ax.set_xlabel("NFE (network evaluations per image)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if legend_outside:
        ax.legend(fontsize=7, ncol=ncol, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7, ncol=ncol)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a DDPM checkpoint")
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS,
                        help=f"comma-separated sampler names (default: all, {DEFAULT_SAMPLERS})")
    parser.add_argument("--nfe", default=DEFAULT_NFE, help=f"comma-separated NFE = steps (default {DEFAULT_NFE})")
    parser.add_argument("--rows", default=None, help="explicit comma-separated <sampler>-<steps> rows instead")
    parser.add_argument("--out", default="outputs/fid_vs_nfe", help="folder for the CSV, JSON and PNG")
    parser.add_argument("--ema-sigma-rel", type=float, default=None,
                        help="sample with the post-hoc EMA of this length (runs with callbacks/posthoc_ema)")
    extractor_args(parser)
    label_args(parser)
    args = parser.parse_args(argv)
    tune_cpu_allocator()  # large CPU tensors reuse freed memory; ATELIER_MALLOC_TUNING=0: glibc's default
    pairs = parse_rows(args)

    model = load_module(args.ckpt, ema_sigma_rel=args.ema_sigma_rel).to(args.device)
    evaluator = make_evaluator(args, args.ckpt)
    labels = sweep_labels(args, model, evaluator)
    rows = []
    for sampler, steps in pairs:
        options = {"sampler": sampler, "num_inference_steps": steps, **autocast_kwargs(model, args.autocast)}
        result = evaluator.evaluate(model, options if labels is None else {**options, "labels": labels})
        rows.append({"sampler": sampler, "NFE": row_nfe(sampler, steps), **result_row(result)})
        print(f"{sampler}-{steps}: fid={result['metrics'].get('fid')}", flush=True)
    columns = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    protocol = record_labels(evaluator.protocol().to_dict(), args, labels)
    write_outputs(Path(args.out), rows, protocol, args.ckpt)
    print(f"\nFID vs NFE for {args.ckpt}\n\n{format_table(rows, columns)}\n")
    print(f"protocol (sampling varies per row):\n{evaluator.protocol().describe()}\n\nwritten to {args.out}")
    return rows


if __name__ == "__main__":
    main()
