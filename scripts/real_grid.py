"""A grid of real images from a class folder, one row per class, at a model's training size: the grid to put
beside a model's sample grid.

    python scripts/real_grid.py --image-size 64 --per-class 8 --out docs/art_real_64px.png
    python scripts/real_grid.py --root /path/to/paintings --image-size 32 --out real_32px.png

Images are chosen at random (``--seed``) within each class (subfolder), fitted as the datamodule fits them
(centre crop to the short side, resize to ``--image-size``, no flips), and saved with the same padding as
Atelier's sample grids (:func:`atelier.callbacks.samples.save_grid`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from atelier.callbacks.samples import save_grid  # noqa: E402
from atelier.data.art_folder import ArtFolderDataModule  # noqa: E402


def real_grid(root: Path, image_size: int, per_class: int, seed: int, cache_dir: Path | None) -> torch.Tensor:
    """``(num_classes · per_class, 3, S, S)`` float in ``[-1, 1]``, class by class.

    Raises:
        ValueError: when a class has fewer than ``per_class`` images (naming the class).
    """
    dm = ArtFolderDataModule(root=root, image_size=image_size, channels=3, val_fraction=0.0, hflip=False,
                             num_workers=0, cache=cache_dir is not None, cache_dir=cache_dir or "unused")
    dm.setup("fit")
    dataset = dm.train_set
    subset = isinstance(dataset, Subset)
    base, indices = (dataset.dataset, dataset.indices) if subset else (dataset, range(len(dataset)))
    labels = torch.tensor([base.targets[i] for i in indices])
    g = torch.Generator().manual_seed(seed)
    picked: list[torch.Tensor] = []
    for c, name in enumerate(dm.classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < per_class:
            raise ValueError(f"class {name!r} has {len(idx)} images, fewer than --per-class {per_class}")
        for i in idx[torch.randperm(len(idx), generator=g)[:per_class]]:
            picked.append(dataset[int(i)][0])
    return torch.stack(picked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_dir = Path(os.environ.get("ATELIER_DATA_DIR", ROOT.parent / "shared" / "data"))
    parser.add_argument("--root", type=Path, default=data_dir / "art")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("outputs/image_cache"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    images = real_grid(args.root, args.image_size, args.per_class, args.seed, args.cache_dir)
    print(f"wrote {save_grid(images, args.out, nrow=args.per_class)} ({len(images)} images at {args.image_size} px)")


if __name__ == "__main__":
    main()
