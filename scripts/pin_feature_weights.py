"""Pin a domain classifier as the packaged evaluation yardstick: strip a ``train.py experiment=<name>`` checkpoint
to its weights and model config and write it where ``feature_extractor=<name>`` reads it by default.

    python train.py experiment=mnist_classifier
    python scripts/pin_feature_weights.py outputs/mnist_classifier/classifier.ckpt --name mnist_classifier
    python scripts/pin_feature_weights.py outputs/art_classifier/classifier.ckpt --name art_classifier

FID/KID/precision/recall on a domain classifier's features are comparable only under the same weights (the
protocol records their SHA-256). A retrained classifier is a new yardstick, so the weights every documented
figure uses ship with the package (``atelier/metrics/weights/<name>.ckpt``, see
:mod:`atelier.metrics.pinned`). Re-pinning is a deliberate act: every documented figure on the old weights
becomes incomparable. The pinned file keeps ``state_dict`` (the network, float32) and the stored model and data
config (:data:`atelier.callbacks.checkpoint_extras.CONFIG_KEY`, what :func:`atelier.tasks.sample.load_module`
rebuilds it from), plus the training step and the validation accuracy when given; optimiser and loop state go.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from atelier.callbacks.checkpoint_extras import CONFIG_KEY  # noqa: E402
from atelier.metrics.pinned import PINNED, pinned_path  # noqa: E402
from atelier.metrics.protocol import file_digest  # noqa: E402
from atelier.tasks.sample import load_module  # noqa: E402


def pin(ckpt: str | Path, name: str, val_acc: float | None = None, out: str | Path | None = None) -> Path:
    """Write the stripped copy of classifier checkpoint ``ckpt`` to ``out`` (default: the packaged path of
    ``name``) and return it.

    Raises:
        ValueError: for a ``name`` that is not a pinned extractor.
        TypeError: when ``ckpt`` holds no classifier.
    """
    if name not in PINNED:
        raise ValueError(f"--name={name!r}: pinned extractors are {sorted(PINNED)}")
    full = torch.load(ckpt, map_location="cpu", weights_only=True)
    module = load_module(ckpt)
    if not callable(getattr(getattr(module, "net", None), "features", None)):
        raise TypeError(f"{ckpt} holds a {type(module).__name__}, not a classifier")
    stripped = {"state_dict": {k: v.float().contiguous() for k, v in full["state_dict"].items()},
                CONFIG_KEY: full[CONFIG_KEY], "global_step": full.get("global_step"), "val_acc": val_acc,
                "source_sha256": file_digest(ckpt)}
    path = Path(out) if out else pinned_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(stripped, path)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a classifier checkpoint from train.py experiment=<name>")
    parser.add_argument("--name", required=True, choices=sorted(PINNED))
    parser.add_argument("--val-acc", type=float, default=None, help="its validation accuracy, kept as a record")
    parser.add_argument("--out", default=None, help="default: the packaged path")
    args = parser.parse_args(argv)
    path = pin(args.ckpt, args.name, args.val_acc, args.out)
    print(f"{path}: {path.stat().st_size / 1e6:.2f} MB, sha256 {file_digest(path)} (from {args.ckpt})")
    return path


if __name__ == "__main__":
    main()
