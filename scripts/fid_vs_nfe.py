"""FID-vs-NFE table for one DDPM checkpoint: the same protocol and noise seed for every sampler row.

    python scripts/fid_vs_nfe.py outputs/ddpm_mnist_cpu/<date>/<time>/checkpoints/last.ckpt --num-samples 1000
    python scripts/fid_vs_nfe.py CKPT --rows ddim-50,ddim-20,ddim-10,dpmpp-20,dpmpp-10   # skip DDPM-1000

Rows are ``<sampler>-<steps>`` (default: ddpm-1000, ddim-50, ddim-20, ddim-10, dpmpp-20, dpmpp-10). DDPM-1000
costs ~2.7 s/image on a 2-core CPU, so leave it out or lower --num-samples for quick looks. Prints the protocol.
"""

from __future__ import annotations

import argparse
import os

from atelier.metrics.evaluator import Evaluator
from atelier.tasks.evaluate import format_table, reference_datamodule, result_row
from atelier.tasks.sample import load_module

DEFAULT_ROWS = "ddpm-1000,ddim-50,ddim-20,ddim-10,dpmpp-20,dpmpp-10"


def extractor_args(parser: argparse.ArgumentParser) -> None:
    """Options shared with scripts/compare.py: extractor, reference and sample counts."""
    parser.add_argument("--feature-extractor", default="mnist_classifier", choices=["mnist_classifier", "inception"])
    parser.add_argument("--classifier-ckpt", default=os.environ.get("ATELIER_MNIST_CLASSIFIER",
                                                                    "outputs/mnist_classifier/classifier.ckpt"))
    parser.add_argument("--inception-weights", default=None, help="Inception weights file (default: torch hub)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--reference-split", default=None, help="train | val | test (default: test if present)")
    parser.add_argument("--reference-size", type=int, default=None, help="default: the whole split")
    parser.add_argument("--metrics", default="fid,kid,is")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.path.join(os.environ.get("ATELIER_OUTPUT_DIR", "outputs"),
                                                            "reference_stats"))
    parser.add_argument("--device", default="cpu")


def make_evaluator(args: argparse.Namespace, ckpt: str) -> Evaluator:
    extractor = {"name": args.feature_extractor}
    if args.feature_extractor == "mnist_classifier":
        extractor["ckpt_path"] = args.classifier_ckpt
    else:
        extractor["weights_path"] = args.inception_weights
    return Evaluator(extractor, reference_datamodule(ckpt), args.metrics.split(","), args.num_samples,
                     args.reference_split, args.reference_size, args.cache_dir, batch_size=args.batch_size,
                     seed=args.seed, device=args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a DDPM checkpoint")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated sampler-steps (default {DEFAULT_ROWS})")
    extractor_args(parser)
    args = parser.parse_args()

    model = load_module(args.ckpt).to(args.device)
    evaluator = make_evaluator(args, args.ckpt)
    rows = []
    for spec in args.rows.split(","):
        sampler, _, steps = spec.strip().partition("-")
        if not steps.isdigit():
            raise SystemExit(f"--rows entry {spec!r} is not <sampler>-<steps> (e.g. ddim-50)")
        result = evaluator.evaluate(model, {"sampler": sampler, "num_inference_steps": int(steps)})
        rows.append({"sampler": sampler, "NFE": int(steps), **result_row(result)})
        print(f"{spec}: fid={result['metrics'].get('fid')}", flush=True)
    columns = [c for c in rows[0] if any(r.get(c) is not None for r in rows)]
    print(f"\nFID vs NFE for {args.ckpt}\n\n{format_table(rows, columns)}\n")
    print(f"protocol (sampling varies per row):\n{evaluator.protocol().describe()}")


if __name__ == "__main__":
    main()
