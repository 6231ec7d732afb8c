"""Does a trained GAN's discriminator still separate real from fake? Mean logits and AUROC, no augmentation.

    python scripts/d_separation.py outputs/gan_art_cpu/<date>/<time>/checkpoints/last.ckpt --num-samples 500

Prints one JSON object per checkpoint (:func:`atelier.metrics.discriminator.discriminator_separation`): D's mean
logit on training reals, held-out reals (the datamodule's validation split) and EMA-generator samples, and the
real-vs-fake AUROC for both real sets (0.5: D cannot tell them apart).

With ``--refit-steps N`` it also trains a copy of D for N steps against the frozen EMA generator
(:func:`atelier.metrics.discriminator.refit_discriminator`) and prints that copy's separation: a D that separates
after a short refit had the capacity, and its failure to separate at the end of training is G keeping up with it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from atelier.metrics.discriminator import discriminator_separation, refit_discriminator  # noqa: E402
from atelier.tasks.evaluate import reference_datamodule  # noqa: E402
from atelier.tasks.sample import load_module  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpts", nargs="+", help="GAN checkpoints")
    parser.add_argument("--num-samples", type=int, default=500, help="images per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refit-steps", type=int, default=0,
                        help="also refit a copy of D for this many steps against the frozen EMA G (0: off)")
    parser.add_argument("--refit-batch-size", type=int, default=64)
    args = parser.parse_args()
    for ckpt in args.ckpts:
        gan = load_module(ckpt)
        if not hasattr(gan, "discriminator"):
            raise SystemExit(f"{ckpt}: {type(gan).__name__} has no discriminator; this script is for GANs")
        datamodule = reference_datamodule(ckpt)
        result = discriminator_separation(gan, datamodule.train_set, getattr(datamodule, "val_set", None),
                                          args.num_samples, args.seed)
        print(json.dumps({"ckpt": str(ckpt), **_rounded(result)}), flush=True)
        if args.refit_steps > 0:
            refit, losses = refit_discriminator(gan, datamodule.train_set, args.refit_steps, args.refit_batch_size,
                                                seed=args.seed)
            result = discriminator_separation(gan, datamodule.train_set, getattr(datamodule, "val_set", None),
                                              args.num_samples, args.seed, discriminator=refit)
            tail = losses[-min(25, len(losses)):]
            print(json.dumps({"ckpt": str(ckpt), "refit_steps": args.refit_steps,
                              "refit_d_loss_first": round(losses[0], 4),
                              "refit_d_loss_last25": round(sum(tail) / len(tail), 4), **_rounded(result)}), flush=True)


def _rounded(result: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


if __name__ == "__main__":
    main()
