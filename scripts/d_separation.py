"""Does a trained GAN's discriminator still separate real from fake? Mean logits and AUROC, no augmentation.

    python scripts/d_separation.py outputs/gan_art_cpu/<date>/<time>/checkpoints/last.ckpt --num-samples 500

Prints one JSON object per checkpoint (:func:`atelier.metrics.discriminator.discriminator_separation`): D's mean
logit on training reals, held-out reals (the datamodule's validation split) and EMA-generator samples, and the
real-vs-fake AUROC for both real sets (0.5: D cannot tell them apart).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from atelier.metrics.discriminator import discriminator_separation  # noqa: E402
from atelier.tasks.evaluate import reference_datamodule  # noqa: E402
from atelier.tasks.sample import load_module  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpts", nargs="+", help="GAN checkpoints")
    parser.add_argument("--num-samples", type=int, default=500, help="images per set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for ckpt in args.ckpts:
        gan = load_module(ckpt)
        if not hasattr(gan, "discriminator"):
            raise SystemExit(f"{ckpt}: {type(gan).__name__} has no discriminator; this script is for GANs")
        datamodule = reference_datamodule(ckpt)
        result = discriminator_separation(gan, datamodule.train_set, getattr(datamodule, "val_set", None),
                                          args.num_samples, args.seed)
        print(json.dumps({"ckpt": str(ckpt), **{k: round(v, 4) if isinstance(v, float) else v
                                                 for k, v in result.items()}}), flush=True)


if __name__ == "__main__":
    main()
