"""Does a model copy its training images? Nearest training images of its samples against those of held-out reals.

    python sample.py ckpt_path=<run>/checkpoints/last.ckpt num_samples=500 hydra.run.dir=<dir>
    python scripts/nearest_neighbours.py --samples <dir>/images --ckpt <run>/checkpoints/last.ckpt \\
        --feature-extractor art_classifier --out <dir>/copies

For every generated image (the PNGs ``sample.py`` writes) and every held-out real image (the validation split,
else the test split, of the data the checkpoint was trained on), the distance to its nearest training image, in the
features of ``--feature-extractor`` (default: the domain classifier of the data: ``art_classifier`` for RGB,
``mnist_classifier`` for grey) or in pixels (``--space pixels``). Mirror images of the training images count when the
data was trained with flips. Prints and writes (``copies.json``) the Mann-Whitney ``z_u`` of the two sets of
distances (Meehan et al. 2020: strongly negative = copying), the share of samples closer to a training image than
the nearest 5 % of held-out reals, the median distances, and saves ``nearest.png``: the ``--show`` samples nearest
to a training image, each beside that training image (sample left, training image right). See
:mod:`atelier.metrics.copies`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from atelier.callbacks.samples import save_grid  # noqa: E402
from atelier.metrics.copies import copy_report  # noqa: E402
from atelier.metrics.protocol import to_uint8  # noqa: E402
from atelier.metrics.suite import build_extractor  # noqa: E402
from atelier.tasks.evaluate import reference_datamodule  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def load_samples(folder: Path, channels: int, size: int) -> torch.Tensor:
    """The images of ``folder`` (sorted by name) as ``(N, channels, size, size)`` float32 in ``[-1, 1]``.

    Raises:
        FileNotFoundError: when the folder holds no images.
        ValueError: naming the first file whose size differs from the training images'.
    """
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images in {folder} (expected the PNGs sample.py writes to <run dir>/images)")
    images = []
    for path in files:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if im.size != (size, size):
                raise ValueError(f"{path} is {im.size[0]}x{im.size[1]} px; the model's training images are "
                                 f"{size}x{size}: sample at the training size")
            images.append(pil_to_tensor(im))
    return torch.stack(images).float() / 127.5 - 1


def split_images(dataset: torch.utils.data.Dataset) -> torch.Tensor:
    """Every image of a split as ``(N, C, H, W)`` float32 in ``[-1, 1]`` (items are ``(image, label)``)."""
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def embed(images: torch.Tensor, extractor: torch.nn.Module | None, batch_size: int = 250) -> torch.Tensor:
    """``(N, D)`` features of ``images`` in ``[-1, 1]``: the extractor's ``features`` or, with none, pixels."""
    if extractor is None:
        return images.flatten(1)
    with torch.no_grad():
        return torch.cat([extractor(to_uint8(images[i:i + batch_size]))["features"]
                          for i in range(0, len(images), batch_size)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=Path, required=True, help="folder of generated images (sample.py images/)")
    parser.add_argument("--ckpt", type=Path, required=True, help="the checkpoint: which data, which split")
    parser.add_argument("--space", choices=["features", "pixels"], default="features")
    parser.add_argument("--feature-extractor", default=None,
                        help="mnist_classifier | art_classifier | inception (default: the data's classifier)")
    parser.add_argument("--data-dir", default=None, help="where the data lives now, if it moved since training")
    parser.add_argument("--close-quantile", type=float, default=0.05,
                        help="held-out quantile below which a sample counts as close (5 %%: folders hold twins)")
    parser.add_argument("--show", type=int, default=16, help="sample / nearest-training pairs in nearest.png")
    parser.add_argument("--out", type=Path, default=None, help="folder for copies.json and nearest.png")
    args = parser.parse_args(argv)

    datamodule = reference_datamodule(args.ckpt, args.data_dir)
    heldout_set = getattr(datamodule, "val_set", None) or getattr(datamodule, "test_set", None)
    if heldout_set is None or len(heldout_set) < 2:
        raise ValueError(f"{type(datamodule).__name__} has no held-out split (val or test) with 2+ images")
    train = split_images(datamodule.train_set)
    heldout = split_images(heldout_set)
    channels, size = train.shape[1], train.shape[-1]
    samples = load_samples(args.samples, channels, size)
    mirrored = bool(dict(getattr(datamodule, "hparams", {}) or {}).get("hflip", False))
    reference = torch.cat([train, train.flip(-1)]) if mirrored else train  # {x, flip x} whatever flip x came in

    extractor = None
    if args.space == "features":
        name = args.feature_extractor or ("art_classifier" if channels == 3 else "mnist_classifier")
        extractor = build_extractor({"name": name}).eval()
    report = copy_report(embed(samples, extractor), embed(reference, extractor), embed(heldout, extractor),
                         args.close_quantile)
    summary = {"samples": str(args.samples), "ckpt": str(args.ckpt), "space": args.space,
               "feature_extractor": getattr(extractor, "name", None), "num_train": len(train),
               "mirrored_train": mirrored, **report.summary()}
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "copies.json").write_text(json.dumps(summary, indent=2) + "\n")
        order = report.sample_distances.argsort()[: args.show]
        pairs = [img for i in order for img in (samples[i], reference[report.sample_indices[i]])]
        save_grid(torch.stack(pairs), args.out / "nearest.png", nrow=8)
        print(f"wrote {args.out / 'copies.json'} and {args.out / 'nearest.png'} (sample left, nearest training "
              f"image right, nearest first)")
    return summary


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    main()
