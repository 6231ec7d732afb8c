"""Images with captions for text-to-image fine-tuning (LoRA, DreamBooth) as a LightningDataModule.

Built on :class:`atelier.data.art_folder.ArtFolderDataModule` (same file discovery, corrupt-file check, seeded split
and loaders); this module adds the caption of each image, the DreamBooth class images, and the data features of
LoRA training at scale: aspect-ratio buckets, caption dropout and tag shuffling, repeats, and cached latents and
text embeddings.

The pieces live beside it (their public names are importable from here too): captions (sidecar ``.txt`` files,
dropout, tag shuffling, repeats) in :mod:`atelier.data.captions`, one captioned item in
:mod:`atelier.data.captioned_dataset`, DreamBooth class images in
:mod:`atelier.data.class_images`, the latent/text cache glue in :mod:`atelier.data.cached_latents`, and the batch
layout (:func:`unpack_batch`) in :mod:`atelier.data.captioned_batch`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, Subset

from atelier.data.art_folder import ArtFolderDataModule, ImageFolderDataset
from atelier.data.cached_latents import ImageEncoder, TextEncoder, fill_cache
from atelier.data.captioned_batch import collate_check, unpack_batch
from atelier.data.captioned_dataset import CaptionedDataset
from atelier.data.captions import (
    CaptionOptions,
    caption_for,
    check_repeats,
    process_caption,
    repeat_indices,
    shuffle_tags,
    sidecar_of,
)
from atelier.data.class_images import ImageGenerator, find_class_images, generate_class_images
from atelier.data.transforms import art_transform
from atelier.text2image.buckets import (
    Bucket,
    BucketBatchSampler,
    assign_bucket,
    bucket_table,
    make_buckets,
    upright_size,
)
from atelier.text2image.latent_cache import LatentCache

__all__ = ["CaptionOptions", "CaptionedDataset", "CaptionedFolderDataModule", "ImageEncoder", "ImageGenerator",
           "TextEncoder", "caption_for", "collate_check", "process_caption", "shuffle_tags", "sidecar_of",
           "unpack_batch"]

log = logging.getLogger(__name__)


class CaptionedFolderDataModule(ArtFolderDataModule):
    """Images under ``root`` with captions, as batches ``(images, captions)``: images ``(B, 3, H, W)`` float32 in
    ``[-1, 1]`` (``H = W = image_size``, or one bucket's size per batch), captions a list of ``B`` strings; with
    DreamBooth class images ``(images, captions, class_images, class_captions)``. With ``cache_latents`` (after
    :meth:`prepare_cache`, which the LoRA module calls at fit start) batches are dicts of cached latents instead
    (see :class:`CaptionedDataset`).

    Captions: a sidecar ``<image>.txt`` per image, else ``instance_prompt`` (``{label}`` becomes the subfolder
    name, e.g. ``"an impressionist painting by {label}"``; DreamBooth: ``"a painting in the style of sks"``).

    DreamBooth prior preservation (Ruiz et al. 2023): with ``class_prompt`` set, ``num_class_images`` images of the
    class are read from ``class_data_dir``; missing ones are generated once by the base model (the LoRA module
    calls :meth:`ensure_class_images` at fit start) and cached there as PNGs for later runs.

    Args:
        root, image_size, batch_size, val_fraction, num_workers, seed, hflip, check_images, pin_memory, cache,
            cache_dir: as in :class:`ArtFolderDataModule` (RGB only; the same file reading, see
            :mod:`atelier.data.image_io`). ``cache`` (decoded square images) is not used with ``buckets``.
        instance_prompt: caption of images without a sidecar ``.txt``.
        class_prompt: DreamBooth class prompt (e.g. ``"a painting"``); ``None`` turns prior preservation off.
        class_data_dir: cache folder of the class images.
        num_class_images: class images to use (generated when missing).
        channels: must be 3 (RGB); the key exists so model configs that read ``data.channels`` compose.
        buckets: aspect-ratio bucketing (:mod:`atelier.text2image.buckets`): buckets of about ``image_size²`` px,
            sides multiples of ``bucket_step``, aspect ratios up to ``bucket_max_ratio``; every batch from one
            bucket (the table is logged once at setup). Class images stay square.
        bucket_step, bucket_max_ratio: see ``buckets``.
        caption_dropout, shuffle_tags, keep_tokens: training caption variation (:class:`CaptionOptions`);
            validation captions never vary.
        repeats: each training image appears ``repeats`` times per epoch (small folders; kohya's repeats).
        cache_latents: encode every training/validation/class image once with the frozen VAE and train on the
            cached latent distributions (:mod:`atelier.text2image.latent_cache`).
        cache_text_embeddings: also cache the text encoder's output per caption (needs ``cache_latents``; ignored,
            with one info line, under ``shuffle_tags``, whose captions are new every step).
        latent_cache_dir: the cache folder.

    Raises:
        ValueError: at setup, when an image has no caption (naming it); at construction, for ``class_prompt``
            without ``class_data_dir`` or with ``num_class_images < 1``, ``repeats < 1``, a bad caption option,
            ``cache_latents`` without ``latent_cache_dir``, ``cache_text_embeddings`` without ``cache_latents``,
            or a bucket setting that gives no bucket.
        RuntimeError: when class images are missing and no generator was given.
    """

    def __init__(self, root: str, image_size: int = 512, batch_size: int = 4, val_fraction: float = 0.0,
                 num_workers: int = 0, seed: int = 0, hflip: bool = True, check_images: bool = True,
                 pin_memory: bool = False, instance_prompt: str | None = None, class_prompt: str | None = None,
                 class_data_dir: str | None = None, num_class_images: int = 100, channels: int = 3,
                 cache: bool = False, cache_dir: str | None = None, buckets: bool = False, bucket_step: int = 64,
                 bucket_max_ratio: float = 2.0, caption_dropout: float = 0.0, shuffle_tags: bool = False,
                 keep_tokens: int = 0, repeats: int = 1, cache_latents: bool = False,
                 cache_text_embeddings: bool = False, latent_cache_dir: str | None = None) -> None:
        if channels != 3:
            raise ValueError(f"data.channels={channels} is not allowed; Stable Diffusion images are RGB (3)")
        super().__init__(root=root, image_size=image_size, channels=3, batch_size=batch_size,
                         val_fraction=val_fraction, num_workers=num_workers, seed=seed, hflip=hflip,
                         check_images=check_images, pin_memory=pin_memory, cache=cache, cache_dir=cache_dir)
        if class_prompt is not None and (class_data_dir is None or num_class_images < 1):
            raise ValueError("data.class_prompt needs data.class_data_dir and data.num_class_images >= 1")
        check_repeats(repeats)
        if cache_latents and not latent_cache_dir:
            raise ValueError("data.cache_latents=true needs data.latent_cache_dir (a writable folder)")
        if cache_text_embeddings and not cache_latents:
            raise ValueError("data.cache_text_embeddings=true needs data.cache_latents=true")
        self.caption_options = CaptionOptions(caption_dropout, shuffle_tags, keep_tokens)
        self.bucket_list: list[Bucket] = make_buckets(image_size, bucket_step, bucket_max_ratio) if buckets else []
        self.class_dir = Path(class_data_dir).expanduser() if class_data_dir else None
        self.latent_cache_dir = Path(latent_cache_dir).expanduser() if latent_cache_dir else None
        self.latent_cache: LatentCache | None = None  # set by prepare_cache
        self.bucket_index: list[int] = []  # per file: index into bucket_list
        self._sources: tuple[ImageFolderDataset, ImageFolderDataset, list[int], list[int]] | None = None
        self._class_ready = False

    @property
    def prior_preservation(self) -> bool:
        """True when DreamBooth class images are used (``class_prompt`` is set)."""
        return self.hparams.class_prompt is not None

    @property
    def cache_latents(self) -> bool:
        """True when training runs on cached latents (the LoRA module then calls :meth:`prepare_cache`)."""
        return bool(self.hparams.cache_latents)

    @property
    def text_cached(self) -> bool:
        """True when text embeddings are cached too (``cache_text_embeddings`` and no tag shuffling)."""
        return bool(self.hparams.cache_text_embeddings) and not self.caption_options.shuffle_tags

    def class_image_paths(self) -> list[Path]:
        """The cached class images (at most ``num_class_images``), sorted."""
        return find_class_images(self.class_dir, self.hparams.num_class_images)

    def ensure_class_images(self, generate: ImageGenerator, batch_size: int = 4) -> list[Path]:
        """Generate the missing class images with ``generate(prompts, seeds)`` (seed = image index) and cache them
        as ``class_XXXXX.png`` in ``class_data_dir``; returns all class image paths. Existing images are kept."""
        if not self.prior_preservation or self.class_dir is None:
            return []
        if self._sources is None:
            self.setup("fit")
        have = self.class_image_paths()
        missing = self.hparams.num_class_images - len(have)
        if missing > 0:
            log.info("generating %d DreamBooth class images for %r into %s", missing, self.hparams.class_prompt,
                     self.class_dir)
            generate_class_images(self.class_dir, self.hparams.class_prompt, len(have), self.hparams.num_class_images,
                                  generate, batch_size)
        self._attach_captions()
        return self.class_image_paths()

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self._sources is not None:
            return
        train, val = self.train_set, self.val_set
        assert isinstance(train, Subset) and isinstance(val, Subset)
        self._sources = (train.dataset, val.dataset, list(train.indices), list(val.indices))
        if self.bucket_list:
            self._assign_buckets(train.dataset.paths)
        self._attach_captions()

    def _assign_buckets(self, paths: Sequence[Path]) -> None:
        """Give every file its bucket (from its upright size, header only) and log the table once."""
        hp = self.hparams
        self.bucket_index = [assign_bucket(*upright_size(p), self.bucket_list) for p in paths]
        if hp.cache:
            log.info("data.cache (square decoded images) is not used with data.buckets=true; cache latents instead "
                     "(data.cache_latents=true)")
        log.info("aspect-ratio buckets at %d px (step %d, ratio <= %s) for %d images: %s", hp.image_size,
                 hp.bucket_step, hp.bucket_max_ratio, len(paths), bucket_table(self.bucket_list, self.bucket_index))

    def _class_set(self) -> ImageFolderDataset | None:
        hp = self.hparams
        if not self.prior_preservation or self.class_dir is None:
            return None
        paths = self.class_image_paths()
        if len(paths) < hp.num_class_images:
            return None
        return ImageFolderDataset(self.class_dir, paths, art_transform(hp.image_size, 3, hp.hflip), hp.image_size)

    def _attach_captions(self) -> None:
        """(Re)build the train/val datasets from the files found at setup: captions, buckets, the class images
        (DreamBooth; the train set is usable once they are all cached), repeats and, after :meth:`prepare_cache`,
        the latent cache."""
        if self._sources is None:
            return
        hp = self.hparams
        train_full, val_full, train_idx, val_idx = self._sources
        class_set = self._class_set()
        self._class_ready = not self.prior_preservation or class_set is not None
        buckets = [self.bucket_list[b] for b in self.bucket_index] if self.bucket_list else None
        common = {"buckets": buckets, "cache": self.latent_cache, "text_cached": self.text_cached}
        train = CaptionedDataset(train_full, hp.instance_prompt, class_set, hp.class_prompt,
                                 options=self.caption_options, hflip=hp.hflip, **common)
        val = CaptionedDataset(val_full, hp.instance_prompt, hflip=False, **common)
        self.train_set = Subset(train, repeat_indices(train_idx, hp.repeats))
        self.val_set = Subset(val, val_idx)

    # ------------------------------------------------------------------ cached latents and text embeddings
    def prepare_cache(self, encode_images: ImageEncoder, encode_texts: TextEncoder, model: str,
                      rank: int = 0, world_size: int = 1, barrier: Callable[[], None] | None = None,
                      batch_size: int | None = None) -> dict[str, int]:
        """Fill the latent cache (and the text cache) for every image the run uses, then switch the datasets to
        cached items.

        What is needed: each train image unflipped and, with ``hflip``, flipped; each validation image unflipped;
        each class image like the train images; with ``text_cached`` every :meth:`CaptionedDataset.fixed_captions`.
        Entries that exist for the file and model as they are now are kept; the rest are encoded in batches of
        ``batch_size`` (default ``data.batch_size``) images of one size. Under DDP each rank encodes every
        ``world_size``-th missing entry and ``barrier`` waits for all.

        Args:
            encode_images: pixels ``(B, 3, H, W)`` float32 in ``[-1, 1]`` → latent distributions
                ``(B, 2·C, H/8, W/8)`` (the LoRA module's :meth:`encode_images`).
            encode_texts: captions → hidden states ``(B, max_length, hidden)``.
            model: the model's :func:`atelier.text2image.latent_cache.model_fingerprint`.
            rank, world_size, barrier: DDP sharding of the work.
            batch_size: images per encoder call.

        Returns:
            counts: ``latents_encoded``, ``latents_reused``, ``texts_encoded``, ``texts_reused`` (this rank's).

        Raises:
            RuntimeError: when called without ``cache_latents`` or before :meth:`setup`.
        """
        if not self.cache_latents or self.latent_cache_dir is None:
            raise RuntimeError("prepare_cache needs data.cache_latents=true and data.latent_cache_dir")
        if self._sources is None:
            self.setup("fit")
        if not self._class_ready:
            raise RuntimeError("DreamBooth class images are missing; call ensure_class_images(generate) first")
        hp = self.hparams
        cache = LatentCache(self.latent_cache_dir, model)
        self.latent_cache = None
        self._attach_captions()  # pixel datasets, to read the images from
        train, val = self.train_set.dataset, self.val_set.dataset  # type: ignore[union-attr]
        assert isinstance(train, CaptionedDataset) and isinstance(val, CaptionedDataset)
        _, _, train_idx, val_idx = self._sources  # type: ignore[misc]
        flips = (False, True) if hp.hflip else (False,)
        groups: list[tuple[CaptionedDataset, Sequence[int], Sequence[bool]]] = [
            (train, train_idx, flips), (val, val_idx, (False,))]
        if train.class_images is not None:
            class_ds = CaptionedDataset(train.class_images, hp.class_prompt)
            groups.append((class_ds, range(len(class_ds)), flips))
        captions = sorted(set(train.fixed_captions() + val.fixed_captions())) if self.text_cached else []
        counts = fill_cache(cache, groups, captions, encode_images, encode_texts, batch_size or hp.batch_size,
                            rank, world_size)
        if not self.text_cached and hp.cache_text_embeddings:
            log.info("data.cache_text_embeddings: not used with data.shuffle_tags=true (a new caption every step); "
                     "the text encoder runs in every step")
        if barrier is not None:
            barrier()
        self.latent_cache = cache
        self._attach_captions()
        log.info("latent cache %s: %d latents encoded, %d reused; %d text embeddings encoded, %d reused",
                 self.latent_cache_dir, counts["latents_encoded"], counts["latents_reused"], counts["texts_encoded"],
                 counts["texts_reused"])
        return counts

    # ------------------------------------------------------------------ loaders
    def _bucket_loader(self, dataset: Subset, shuffle: bool) -> DataLoader:
        """A loader whose batches each come from one bucket (:class:`BucketBatchSampler`)."""
        hp = self.hparams
        ids = [self.bucket_index[i] for i in dataset.indices]
        sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
        batches = BucketBatchSampler(sampler, hp.batch_size, drop_last=False, bucket_ids=ids, seed=hp.seed)
        return DataLoader(dataset, batch_sampler=batches, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0, pin_memory=hp.pin_memory)

    def train_dataloader(self) -> Any:
        if self.prior_preservation and not self._class_ready:
            raise RuntimeError(f"{self.hparams.num_class_images} DreamBooth class images are needed in "
                               f"{self.class_dir}; call ensure_class_images(generate) first (the LoRA module does)")
        if self.bucket_list:
            assert isinstance(self.train_set, Subset)
            return self._bucket_loader(self.train_set, shuffle=True)
        return super().train_dataloader()

    def val_dataloader(self) -> Any:
        if self.bucket_list:
            assert isinstance(self.val_set, Subset)
            return self._bucket_loader(self.val_set, shuffle=False)
        return super().val_dataloader()
