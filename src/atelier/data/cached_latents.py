"""Glue between the captioned datasets (:mod:`atelier.data.captioned_folder`) and the on-disk cache of VAE latents
and text embeddings (:class:`atelier.text2image.latent_cache.LatentCache`): the crop part of an entry's key,
reading entries (with an error that says what to do when one is gone), and filling the cache in batches.

:meth:`atelier.data.captioned_folder.CaptionedFolderDataModule.prepare_cache` decides what the run needs and logs
the counts; :func:`fill_cache` does the work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from atelier.text2image.buckets import Bucket
from atelier.text2image.latent_cache import LatentCache

if TYPE_CHECKING:
    from atelier.data.captioned_dataset import CaptionedDataset

#: ``encode_images(pixels (B, 3, H, W) float32 in [-1, 1]) -> latent distributions (B, 2·C, H/8, W/8)``
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
#: ``encode_texts(captions) -> hidden states (B, max_length, hidden)``
TextEncoder = Callable[[Sequence[str]], torch.Tensor]
#: one latent to have in the cache: ``(dataset, item index, crop key, flipped)``
LatentJob = tuple["CaptionedDataset", int, dict[str, Any], bool]


def crop_key(mode: str, size: Bucket) -> dict[str, Any]:
    """The crop part of a latent-cache key: how the image was fitted and to what ``(width, height)``."""
    return {"mode": mode, "size": [int(size[0]), int(size[1])]}


def load_cached_latent(cache: LatentCache, path: Path, crop: Mapping[str, Any], flip: bool) -> torch.Tensor:
    """The cached latent distribution of ``path`` fitted as ``crop`` (flipped or not).

    Raises:
        RuntimeError: when the entry is missing or the file changed since caching.
    """
    value = cache.load_latent(path, crop, flip)
    if value is None:
        raise RuntimeError(f"no cached latent for {path} ({crop}, flip={flip}): the file changed or the cache "
                           f"under {cache.root} was cleared since training started; restart the run to "
                           "re-encode it")
    return value


def load_cached_text(cache: LatentCache, caption: str) -> torch.Tensor:
    """The cached text embedding of ``caption``.

    Raises:
        RuntimeError: when there is none.
    """
    value = cache.load_text(caption)
    if value is None:
        raise RuntimeError(f"no cached text embedding for caption {caption!r} under {cache.root}; restart "
                           "the run to re-encode it")
    return value


def latent_jobs(groups: Iterable[tuple[CaptionedDataset, Iterable[int], Sequence[bool]]]
                ) -> dict[tuple[str, str, bool], LatentJob]:
    """Every latent the ``(dataset, item indices, flips)`` groups need, keyed by ``(file, crop, flip)`` (an entry
    needed twice is listed once; the later group's job is kept)."""
    jobs: dict[tuple[str, str, bool], LatentJob] = {}
    for ds, indices, flips in groups:
        for i in indices:
            for flip in flips:
                crop = ds.crop(i)
                jobs[(str(ds.images.paths[i]), str(crop), flip)] = (ds, i, crop, flip)
    return jobs


def missing_latents(cache: LatentCache, jobs: Mapping[tuple[str, str, bool], LatentJob]) -> list[LatentJob]:
    """The jobs, in key order, whose entry is not in ``cache`` for the file as it is now."""
    return [job for key, job in sorted(jobs.items())
            if cache.load_latent(job[0].images.paths[job[1]], job[2], job[3]) is None]


def encode_latents(cache: LatentCache, jobs: Sequence[LatentJob], encode_images: ImageEncoder,
                   batch_size: int) -> None:
    """Encode the ``jobs``' images with ``encode_images``, in batches of up to ``batch_size`` images of one size,
    and store the latent distributions in ``cache``."""
    by_size: dict[Bucket, list[LatentJob]] = {}
    for job in jobs:
        by_size.setdefault(job[0].size(job[1]), []).append(job)
    for group in by_size.values():
        for first in range(0, len(group), batch_size):
            chunk = group[first:first + batch_size]
            pixels = torch.stack([ds.pixels(i, flip) for ds, i, _, flip in chunk])
            with torch.no_grad():
                encoded = encode_images(pixels)
            for (ds, i, crop, flip), value in zip(chunk, encoded, strict=True):
                cache.save_latent(ds.images.paths[i], crop, flip, value)


def encode_captions(cache: LatentCache, captions: Sequence[str], encode_texts: TextEncoder, batch_size: int) -> None:
    """Encode ``captions`` with ``encode_texts`` in batches of ``batch_size`` and store the hidden states in
    ``cache``."""
    for first in range(0, len(captions), batch_size):
        chunk = captions[first:first + batch_size]
        with torch.no_grad():
            hidden = encode_texts(chunk)
        for caption, value in zip(chunk, hidden, strict=True):
            cache.save_text(caption, value)


def fill_cache(cache: LatentCache, groups: Iterable[tuple[CaptionedDataset, Iterable[int], Sequence[bool]]],
               captions: Sequence[str], encode_images: ImageEncoder, encode_texts: TextEncoder, batch_size: int,
               rank: int = 0, world_size: int = 1) -> dict[str, int]:
    """Encode what ``cache`` lacks: the latents of the ``(dataset, item indices, flips)`` groups
    (:func:`latent_jobs`) and the text embeddings of ``captions`` (sorted, unique), ``batch_size`` per encoder
    call. Entries that exist for the file and model as they are now are kept. Under DDP each rank encodes every
    ``world_size``-th missing entry (the caller waits for all ranks).

    Returns:
        counts: ``latents_encoded``, ``latents_reused``, ``texts_encoded``, ``texts_reused`` (this rank's).
    """
    jobs = latent_jobs(groups)
    todo = missing_latents(cache, jobs)
    mine = todo[rank::world_size]
    encode_latents(cache, mine, encode_images, batch_size)
    texts_todo = [c for c in captions if cache.load_text(c) is None][rank::world_size]
    encode_captions(cache, texts_todo, encode_texts, batch_size)
    return {"latents_encoded": len(mine), "latents_reused": len(jobs) - len(todo),
            "texts_encoded": len(texts_todo), "texts_reused": len(captions) - len(texts_todo)}
