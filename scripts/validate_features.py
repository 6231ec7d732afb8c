"""Does a feature extractor measure what it should? FID/KID/precision/recall of real vs real and real vs degraded.

    python scripts/validate_features.py                                 # the art classifier on the art folder
    python scripts/validate_features.py --feature-extractor art_simclr  # the self-supervised art network
    python scripts/validate_features.py --seeds 0 1 2 --csv docs/art_features_validation.csv

The folder's images (all of them, at ``--image-size``, no flips) are split at random into two disjoint halves A
and B, once per seed. A is the reference. Rows: B as it is (real vs real: should be small), then B degraded by
each of :data:`atelier.metrics.degrade.DEGRADATIONS` at three growing levels (blur σ px, Gaussian noise σ, hue
rotation in turns, tiles shuffled at 32/16/8 px): a useful extractor gives numbers far above real-vs-real that
grow with the level. Prints mean ± std over the seeds and writes one CSV row per (condition, level, seed).

``--downscale 48 32`` adds rows for B drawn at fewer pixels (resized down, antialiased, and scored as generated
images are: the extractor resizes them back up). Such a row is the best score a perfect model trained at that
size can reach against a reference at ``--image-size``:

    python scripts/validate_features.py --seeds 0 1 2 --downscale 48 32 16
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from atelier.data.art_folder import ArtFolderDataModule  # noqa: E402
from atelier.metrics.cache import ReferenceStats  # noqa: E402
from atelier.metrics.degrade import DEGRADATIONS  # noqa: E402
from atelier.metrics.protocol import to_uint8  # noqa: E402
from atelier.metrics.suite import GenerativeMetrics, build_extractor  # noqa: E402

METRICS = ("fid", "kid", "precision", "recall")


def load_images(root: Path, image_size: int, cache_dir: Path) -> torch.Tensor:
    """Every image under ``root`` as uint8 ``(N, 3, S, S)`` (centre crop, resize; no flips), in file order."""
    dm = ArtFolderDataModule(root=root, image_size=image_size, channels=3, val_fraction=0.0, hflip=False,
                             num_workers=0, cache=True, cache_dir=cache_dir, batch_size=256)
    dm.setup("fit")
    return torch.cat([to_uint8(x) for x, _ in DataLoader(dm.train_set, batch_size=256, shuffle=False)])


@torch.no_grad()
def features(extractor: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([extractor(images[i:i + batch_size])["features"] for i in range(0, len(images), batch_size)])


def score(metrics: GenerativeMetrics, images: torch.Tensor, seed: int, batch_size: int = 256) -> dict[str, float]:
    metrics.reset()
    for i in range(0, len(images), batch_size):
        metrics.update(images[i:i + batch_size])
    out = metrics.compute(seed=seed)
    return {k: float(out[k]) for k in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_dir = Path(os.environ.get("ATELIER_DATA_DIR", ROOT.parent / "shared" / "data"))
    parser.add_argument("--root", type=Path, default=data_dir / "art")
    parser.add_argument("--feature-extractor", default="art_classifier", choices=["art_classifier", "art_simclr"],
                        help="the art classifier (artist labels) or the self-supervised network (no labels)")
    parser.add_argument("--classifier-ckpt", default=None,
                        help="default: $ATELIER_ART_CLASSIFIER / $ATELIER_ART_SIMCLR, else the pinned weights "
                             "(atelier.metrics.pinned)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache-dir", type=Path, default=Path("outputs/image_cache"))
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--downscale", type=int, nargs="*", default=[],
                        help="also score B resized down to these sizes (px): a perfect model's floor at that size")
    args = parser.parse_args()

    ckpt = args.classifier_ckpt or os.environ.get(f"ATELIER_{args.feature_extractor.upper()}")
    extractor = build_extractor({"name": args.feature_extractor, "ckpt_path": ckpt})
    images = load_images(args.root, args.image_size, args.cache_dir)
    print(f"{len(images)} images at {args.image_size} px from {args.root}; extractor {extractor.weights} "
          f"(sha256 {extractor.weights_sha256}), {extractor.feature_layer}")
    rows: list[dict[str, object]] = []
    for seed in args.seeds:
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(images), generator=g)
        half = len(images) // 2
        a, b = images[perm[:half]], images[perm[half:2 * half]]
        metrics = GenerativeMetrics(extractor, METRICS, class_histogram=False)
        metrics.set_reference(ReferenceStats.from_features(features(extractor, a), {}))
        rows.append({"condition": "real (other half)", "level": 0, "seed": seed, **score(metrics, b, seed)})
        b01 = b.float() / 255
        for name, (fn, levels) in DEGRADATIONS.items():
            for level in levels:
                degraded = to_uint8(fn(b01, level, generator=g) * 2 - 1)
                rows.append({"condition": name, "level": level, "seed": seed, **score(metrics, degraded, seed)})
        for size in args.downscale:
            smaller = TF.resize(b, [size, size], antialias=True)
            rows.append({"condition": "downscaled", "level": size, "seed": seed, **score(metrics, smaller, seed)})
        print(f"seed {seed}: done ({half} vs {half} images)", flush=True)

    print(f"\n| condition | level | FID | KID | precision | recall |   (mean ± std over seeds {args.seeds})")
    print("|---|---|---|---|---|---|")
    keys = list(dict.fromkeys((r["condition"], r["level"]) for r in rows))
    for cond, level in keys:
        sel = [r for r in rows if r["condition"] == cond and r["level"] == level]

        def ms(k: str, scale: float = 1.0, sel: list[dict[str, object]] = sel) -> str:
            v = [float(r[k]) * scale for r in sel]  # type: ignore[arg-type]
            return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"

        print(f"| {cond} | {level} | {ms('fid')} | {ms('kid')} | {ms('precision')} | {ms('recall')} |")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["condition", "level", "seed", *METRICS])
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
