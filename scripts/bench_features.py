"""Feature-extraction speed: the bare feature network vs the same network through Atelier's metric pipeline.

    python scripts/bench_features.py [--ckpt outputs/mnist_classifier/classifier.ckpt] [--n 5000] [--batch 250]
    python scripts/bench_features.py --extractor inception --random-weights --n 64 --batch 32

"bare": ``net.features(x)`` on ready float tensors. "pipeline": uint8 quantisation + preprocessing + the
extractor + FID/KID/IS updates (``GenerativeMetrics.update``), i.e. what ``evaluate.py`` does per batch.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from atelier.metrics.cache import ReferenceStats
from atelier.metrics.suite import GenerativeMetrics, build_extractor


def rate(fn, batches: list[torch.Tensor]) -> float:
    fn(batches[0])  # warm-up
    start = time.perf_counter()
    for b in batches:
        fn(b)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extractor", default="mnist_classifier", choices=["mnist_classifier", "inception"])
    parser.add_argument("--ckpt", default=os.environ.get("ATELIER_MNIST_CLASSIFIER"),
                        help="default: $ATELIER_MNIST_CLASSIFIER, else the pinned weights (atelier.metrics.pinned)")
    parser.add_argument("--random-weights", action="store_true", help="Inception with random weights")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--size", type=int, default=32, help="image side in px")
    args = parser.parse_args()

    cfg = {"name": args.extractor}
    cfg.update({"ckpt_path": args.ckpt} if args.extractor == "mnist_classifier"
               else {"random_weights": args.random_weights})
    extractor = build_extractor(cfg)
    torch.manual_seed(0)
    images = torch.rand(args.n, 1, args.size, args.size) * 2 - 1
    batches = list(images.split(args.batch))

    as_uint8 = [((b + 1) * 127.5).round().to(torch.uint8) for b in batches]
    net = extractor.net
    with torch.no_grad():
        if args.extractor == "mnist_classifier":
            ready = [extractor.preprocess(b) for b in as_uint8]
            bare = rate(net.features, ready)
        else:
            bare = rate(net._torch_fidelity_forward, [b.expand(-1, 3, -1, -1) for b in as_uint8])
        metrics = GenerativeMetrics(extractor, ["fid", "kid", "is"])
        metrics.set_reference(ReferenceStats.from_features(extractor(as_uint8[0])["features"], {}))
    pipeline = rate(metrics.update, batches)
    print(f"extractor {args.extractor}: {args.n} images {args.size} px, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    print(f"bare network       : {bare:10.1f} images/s")
    print(f"metric pipeline    : {pipeline:10.1f} images/s  ({pipeline / bare:.0%} of bare)")


if __name__ == "__main__":
    main()
