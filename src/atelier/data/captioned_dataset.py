"""One captioned item: an image of an :class:`~atelier.data.art_folder.ImageFolderDataset` with its caption (the
instance prompt, its sidecar ``.txt`` or a DreamBooth class prompt), optionally from cached latents and text
embeddings. The datamodule that builds these is :class:`atelier.data.captioned_folder.CaptionedFolderDataModule`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from atelier.data.art_folder import ImageFolderDataset
from atelier.data.cached_latents import crop_key, load_cached_latent, load_cached_text
from atelier.data.captions import CaptionOptions, caption_for, has_sidecar_caption, process_caption
from atelier.data.image_io import load_rgb
from atelier.data.transforms import to_unit_range
from atelier.text2image.buckets import Bucket, load_bucketed
from atelier.text2image.latent_cache import LatentCache


class CaptionedDataset(Dataset):
    """Captioned training items over an :class:`ImageFolderDataset`'s files.

    Without a latent cache, items are tuples as before: ``(image, caption)``, with ``class_images`` (DreamBooth
    prior preservation) ``(image, caption, class_image, class_caption)`` (class image ``i mod len(class_images)``);
    images ``(3, H, W)`` float32 in ``[-1, 1]``, ``H × W`` = ``image_size``² or the image's bucket. With ``cache``,
    items are dicts: ``latents`` ``(2·C, h, w)`` (the cached VAE latent distribution; the flipped image's with
    probability 1/2 under ``hflip``), ``caption``, and with ``text_cached`` ``text_embedding``
    ``(max_length, hidden)``; DreamBooth adds ``class_latents``, ``class_caption`` (and ``class_text_embedding``).

    Args:
        images: the files (``paths``, ``image_size``, ``cache_dir`` and ``classes`` are used; its transform is not).
        instance_prompt: caption of images without a sidecar ``.txt``.
        class_images, class_prompt: DreamBooth class images (square, ``image_size``) and their caption.
        options: caption dropout / tag shuffling (``None``: captions as written, e.g. for validation).
        buckets: per file, its bucket ``(width, height)``; ``None``: square ``image_size`` crops.
        hflip: random horizontal flips.
        cache: the latent cache (filled by :meth:`CaptionedFolderDataModule.prepare_cache`).
        text_cached: items carry cached text embeddings (needs ``cache``; not with tag shuffling).

    Raises:
        ValueError: when an image has no caption (naming it).
        RuntimeError: from ``__getitem__`` with a cache, when an entry is missing or its file changed since caching.
    """

    def __init__(self, images: ImageFolderDataset, instance_prompt: str | None,
                 class_images: ImageFolderDataset | None = None, class_prompt: str | None = None, *,
                 options: CaptionOptions | None = None, buckets: Sequence[Bucket] | None = None,
                 hflip: bool = False, cache: LatentCache | None = None, text_cached: bool = False) -> None:
        self.images = images
        self.captions = [caption_for(p, images.classes[t], instance_prompt)
                         for p, t in zip(images.paths, images.targets, strict=True)]
        self.sidecar = [has_sidecar_caption(p) for p in images.paths]
        self.class_images = class_images
        self.class_prompt = class_prompt
        self.options = options or CaptionOptions()
        self.buckets = list(buckets) if buckets is not None else None
        self.hflip = hflip
        self.cache = cache
        self.text_cached = text_cached and cache is not None
        self._to_tensor = to_unit_range()

    def __len__(self) -> int:
        return len(self.images)

    # ------------------------------------------------------------------ pieces
    def size(self, i: int) -> Bucket:
        """``(width, height)`` of item ``i``'s training image."""
        if self.buckets is not None:
            return self.buckets[i]
        s = int(self.images.image_size)
        return s, s

    def crop(self, i: int) -> dict[str, Any]:
        """The latent-cache crop key of item ``i``."""
        return crop_key("bucket" if self.buckets is not None else "square", self.size(i))

    def pixels(self, i: int, flip: bool = False) -> torch.Tensor:
        """Item ``i``'s image ``(3, H, W)`` float32 in ``[-1, 1]``, deterministic (flipped left-right with ``flip``).

        Raises:
            atelier.data.image_io.UnreadableImageError: for a file that cannot be decoded.
        """
        path = self.images.paths[i]
        if self.buckets is not None:
            image = load_bucketed(path, self.buckets[i])
        else:
            image = load_rgb(path, self.images.image_size, self.images.cache_dir)
        x = self._to_tensor(image)
        return x.flip(-1) if flip else x

    def caption(self, i: int, generator: torch.Generator | None = None) -> str:
        """A training draw of item ``i``'s caption (:func:`process_caption`)."""
        return process_caption(self.captions[i], self.options, self.sidecar[i], generator)

    def fixed_captions(self) -> list[str]:
        """Every caption an item can have when tags are not shuffled: the captions, plus ``""`` with caption
        dropout, plus the class prompt; sorted, unique."""
        found = set(self.captions)
        if self.options.dropout > 0:
            found.add("")
        if self.class_images is not None and self.class_prompt is not None:
            found.add(self.class_prompt)
        return sorted(found)

    def _flip(self) -> bool:
        return self.hflip and bool(torch.rand(()) < 0.5)

    # ------------------------------------------------------------------ items
    def __getitem__(self, i: int) -> Any:
        caption = self.caption(i)
        n_class = len(self.class_images) if self.class_images is not None else 0
        if self.cache is None:
            image = self.pixels(i, self._flip())
            if not n_class:
                return image, caption
            class_image, _ = self.class_images[i % n_class]
            return image, caption, class_image, self.class_prompt
        item: dict[str, Any] = {"latents": load_cached_latent(self.cache, self.images.paths[i], self.crop(i),
                                                              self._flip()),
                                "caption": caption}
        if self.text_cached:
            item["text_embedding"] = load_cached_text(self.cache, caption)
        if n_class:
            assert self.class_images is not None and self.class_prompt is not None
            s = int(self.class_images.image_size)
            item["class_latents"] = load_cached_latent(self.cache, self.class_images.paths[i % n_class],
                                                       crop_key("square", (s, s)), self._flip())
            item["class_caption"] = self.class_prompt
            if self.text_cached:
                item["class_text_embedding"] = load_cached_text(self.cache, self.class_prompt)
        return item
