"""LoRA data features on the tiny model's data path: aspect-ratio buckets (equal area, aspect kept, batches
never mix buckets), caption dropout, tag shuffling with keep_tokens, repeats."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler, RandomSampler

from atelier.data.captioned_folder import (
    CaptionOptions,
    process_caption,
    shuffle_tags,
)
from atelier.text2image.buckets import (
    BucketBatchSampler,
    assign_bucket,
    bucket_tolerance,
    fit_to_bucket,
    make_buckets,
)
from tests import sd_fixtures
from tests.test_sd_features import make_data

tiny_sd = sd_fixtures.tiny_sd
caption_dir = sd_fixtures.caption_dir
bucket_dir = sd_fixtures.bucket_dir



def test_bucket_table_is_about_equal_area_and_in_steps() -> None:
    buckets = make_buckets(512, 64, 2.0)
    assert set(buckets) == {(512, 512), (576, 448), (448, 576), (640, 384), (384, 640)}
    for w, h in make_buckets(512, 64, 4.0):
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w, h) / min(w, h) <= 4.0
        assert w * h >= 0.75 * 512 * 512
    with pytest.raises(ValueError, match="multiple"):
        make_buckets(500, 64)


def test_images_keep_their_aspect_ratio_within_the_bucket_tolerance() -> None:
    buckets = make_buckets(512, 64, 2.0)
    rng = np.random.default_rng(0)
    for _ in range(500):
        ratio = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        w = int(rng.integers(200, 4000))
        h = max(1, round(w / ratio))
        i = assign_bucket(w, h, buckets)
        low, high = bucket_tolerance(buckets, i)
        assert low <= math.log(w / h) <= high  # nearest bucket: within halfway to the neighbours
        bw, bh = buckets[i]
        assert abs(math.log(w / h) - math.log(bw / bh)) <= 0.19  # at most ~17 % of one side cropped away
    for size in ((1200, 700), (700, 1200), (513, 512), (333, 1000), (2000, 1000)):
        bucket = buckets[assign_bucket(*size, buckets)]
        assert fit_to_bucket(Image.new("RGB", size), bucket).size == bucket


def test_bucket_batches_never_mix_buckets_and_cover_each_index_once() -> None:
    ids = [0, 1, 2, 1, 0, 0, 2, 2, 2, 1, 0, 1, 1]
    sampler = BucketBatchSampler(RandomSampler(range(len(ids))), batch_size=2, drop_last=False, bucket_ids=ids)
    epochs = [list(sampler) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(ids)))
        assert all(len({ids[i] for i in b}) == 1 for b in batches)
    assert epochs[0] != epochs[1]  # a new shuffle each epoch
    # DDP: the same batches split between the ranks, as many on each, none twice
    ranks = []
    for rank in (0, 1):
        dist = DistributedSampler(range(len(ids)), num_replicas=2, rank=rank, shuffle=True, seed=3)
        dist.set_epoch(1)
        ranks.append(list(BucketBatchSampler(dist, 2, False, ids)))
    assert len(ranks[0]) == len(ranks[1]) > 0
    flat = [i for r in ranks for b in r for i in b]
    assert len(flat) == len(set(flat))
    assert all(len({ids[i] for i in b}) == 1 for r in ranks for b in r)


def test_bucketed_datamodule_batches_share_one_shape(bucket_dir: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    data = make_data(bucket_dir, buckets=True, bucket_step=8, batch_size=2)
    with caplog.at_level(logging.INFO, logger="atelier.data.captioned_folder"):
        data.setup("fit")
        data.setup("fit")
    tables = [r.getMessage() for r in caplog.records if "aspect-ratio buckets" in r.getMessage()]
    assert len(tables) == 1 and "24x40: 2" in tables[0] and "40x24: 2" in tables[0] and "32x32: 2" in tables[0]
    shapes = set()
    for images, captions in data.train_dataloader():
        assert images.shape[0] == len(captions) and images.min() >= -1 and images.max() <= 1
        shapes.add(tuple(images.shape[2:]))
    assert shapes == {(40, 24), (32, 32), (24, 40)}  # (H, W): portrait, square, landscape


# ---------------------------------------------------------------- captions, repeats
def test_caption_dropout_rate() -> None:
    options = CaptionOptions(dropout=0.3)
    generator = torch.Generator().manual_seed(0)
    draws = [process_caption("a harbour, dawn", options, True, generator) for _ in range(10_000)]
    assert abs(draws.count("") / len(draws) - 0.3) < 0.02
    assert set(draws) == {"", "a harbour, dawn"}
    with pytest.raises(ValueError, match="caption_dropout"):
        CaptionOptions(dropout=1.5)


def test_tag_shuffling_keeps_the_first_keep_tokens_tags() -> None:
    caption = "sks style, monet, harbour, boats, dawn, fog, oil on canvas"
    tags = [t.strip() for t in caption.split(",")]
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        out = shuffle_tags(caption, keep_tokens=2, generator=generator).split(", ")
        assert out[:2] == tags[:2] and sorted(out) == sorted(tags)
        seen.add(tuple(out))
    assert len(seen) > 50  # the other five tags really move
    options = CaptionOptions(shuffle_tags=True, keep_tokens=1)
    assert process_caption("a painting by monet, x", options, sidecar=False) == "a painting by monet, x"


def test_datamodule_caption_options_and_repeats(bucket_dir: Path) -> None:
    data = make_data(bucket_dir, shuffle_tags=True, keep_tokens=1, repeats=3, caption_dropout=0.5)
    data.setup("fit")
    assert len(data.train_set) == 3 * 6
    torch.manual_seed(0)
    captions = [data.train_set[i][1] for i in range(len(data.train_set))] * 10
    captions += [data.train_set[i][1] for i in range(len(data.train_set))]
    nonempty = [c for c in captions if c]
    assert 0 < len(nonempty) < len(captions)
    assert all(c.split(", ")[0].startswith("style") for c in nonempty)
    val = make_data(bucket_dir, val_fraction=0.2, caption_dropout=1.0)
    val.setup("fit")
    assert all(val.val_set[i][1] for i in range(len(val.val_set)))  # validation captions never vary
    assert not any(val.train_set[i][1] for i in range(len(val.train_set)))


# ---------------------------------------------------------------- noise offset
