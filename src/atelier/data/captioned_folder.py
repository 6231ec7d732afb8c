"""Images with captions for text-to-image fine-tuning (LoRA, DreamBooth) as a LightningDataModule.

Built on :class:`atelier.data.art_folder.ArtFolderDataModule` (same file discovery, corrupt-file check, transforms,
seeded split and loaders); this module only adds the caption of each image and, for DreamBooth, the class images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from atelier.data.art_folder import ArtFolderDataModule, ImageFolderDataset, find_images
from atelier.data.transforms import art_transform

log = logging.getLogger(__name__)

#: ``generate(prompts, seeds) -> PIL images``, e.g. the base pipeline of the LoRA module
ImageGenerator = Callable[[Sequence[str], Sequence[int]], list[Image.Image]]


def caption_for(path: Path, label: str, instance_prompt: str | None) -> str:
    """The caption of the image at ``path``: its sidecar ``<name>.txt`` (stripped) when present, else
    ``instance_prompt`` with ``{label}`` replaced by the image's subfolder name.

    Raises:
        ValueError: when there is neither a (non-empty) sidecar nor an ``instance_prompt``, naming the image.
    """
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8").strip()
        if text:
            return text
    if instance_prompt is None:
        raise ValueError(f"{path} has no caption: write {sidecar.name} beside it or set data.instance_prompt")
    return instance_prompt.replace("{label}", label)


class CaptionedDataset(Dataset):
    """``(image, caption)`` pairs over an :class:`ImageFolderDataset`; with ``class_images`` (DreamBooth prior
    preservation) ``(image, caption, class_image, class_caption)``, class image ``i mod len(class_images)``.

    Images are ``(3, H, W)`` float32 in ``[-1, 1]``; captions are strings (tokenized by the model).
    """

    def __init__(self, images: ImageFolderDataset, instance_prompt: str | None,
                 class_images: ImageFolderDataset | None = None, class_prompt: str | None = None) -> None:
        self.images = images
        self.captions = [caption_for(p, images.classes[t], instance_prompt)
                         for p, t in zip(images.paths, images.targets, strict=True)]
        self.class_images = class_images
        self.class_prompt = class_prompt

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        image, _ = self.images[i]
        if self.class_images is None:
            return image, self.captions[i]
        class_image, _ = self.class_images[i % len(self.class_images)]
        return image, self.captions[i], class_image, self.class_prompt


class CaptionedFolderDataModule(ArtFolderDataModule):
    """Images under ``root`` with captions, as batches ``(images, captions)``: images ``(B, 3, S, S)`` float32 in
    ``[-1, 1]``, captions a list of ``B`` strings; with DreamBooth class images ``(images, captions, class_images,
    class_captions)``.

    Captions: a sidecar ``<image>.txt`` per image, else ``instance_prompt`` (``{label}`` becomes the subfolder
    name, e.g. ``"an impressionist painting by {label}"``; DreamBooth: ``"a painting in the style of sks"``).

    DreamBooth prior preservation (Ruiz et al. 2023): with ``class_prompt`` set, ``num_class_images`` images of the
    class are read from ``class_data_dir``; missing ones are generated once by the base model (the LoRA module
    calls :meth:`ensure_class_images` at fit start) and cached there as PNGs for later runs.

    Args:
        root, image_size, batch_size, val_fraction, num_workers, seed, hflip, check_images, pin_memory, cache,
            cache_dir: as in :class:`ArtFolderDataModule` (RGB only; the same file reading, see
            :mod:`atelier.data.image_io`).
        instance_prompt: caption of images without a sidecar ``.txt``.
        class_prompt: DreamBooth class prompt (e.g. ``"a painting"``); ``None`` turns prior preservation off.
        class_data_dir: cache folder of the class images.
        num_class_images: class images to use (generated when missing).
        channels: must be 3 (RGB); the key exists so model configs that read ``data.channels`` compose.

    Raises:
        ValueError: at setup, when an image has no caption (naming it), or ``class_prompt`` is set without
            ``class_data_dir`` or with ``num_class_images < 1``.
        RuntimeError: when class images are missing and no generator was given.
    """

    def __init__(self, root: str, image_size: int = 512, batch_size: int = 4, val_fraction: float = 0.0,
                 num_workers: int = 0, seed: int = 0, hflip: bool = True, check_images: bool = True,
                 pin_memory: bool = False, instance_prompt: str | None = None, class_prompt: str | None = None,
                 class_data_dir: str | None = None, num_class_images: int = 100, channels: int = 3,
                 cache: bool = False, cache_dir: str | None = None) -> None:
        if channels != 3:
            raise ValueError(f"data.channels={channels} is not allowed; Stable Diffusion images are RGB (3)")
        super().__init__(root=root, image_size=image_size, channels=3, batch_size=batch_size,
                         val_fraction=val_fraction, num_workers=num_workers, seed=seed, hflip=hflip,
                         check_images=check_images, pin_memory=pin_memory, cache=cache, cache_dir=cache_dir)
        if class_prompt is not None and (class_data_dir is None or num_class_images < 1):
            raise ValueError("data.class_prompt needs data.class_data_dir and data.num_class_images >= 1")
        self.class_dir = Path(class_data_dir).expanduser() if class_data_dir else None

    @property
    def prior_preservation(self) -> bool:
        """True when DreamBooth class images are used (``class_prompt`` is set)."""
        return self.hparams.class_prompt is not None

    def class_image_paths(self) -> list[Path]:
        """The cached class images (at most ``num_class_images``), sorted."""
        if self.class_dir is None or not self.class_dir.is_dir():
            return []
        return find_images(self.class_dir)[: self.hparams.num_class_images]

    def ensure_class_images(self, generate: ImageGenerator, batch_size: int = 4) -> list[Path]:
        """Generate the missing class images with ``generate(prompts, seeds)`` (seed = image index) and cache them
        as ``class_XXXXX.png`` in ``class_data_dir``; returns all class image paths. Existing images are kept."""
        if not self.prior_preservation or self.class_dir is None:
            return []
        if self.train_set is None:
            self.setup("fit")
        have = self.class_image_paths()
        missing = self.hparams.num_class_images - len(have)
        if missing > 0:
            log.info("generating %d DreamBooth class images for %r into %s", missing, self.hparams.class_prompt,
                     self.class_dir)
            self.class_dir.mkdir(parents=True, exist_ok=True)
            for first in range(len(have), self.hparams.num_class_images, batch_size):
                seeds = list(range(first, min(first + batch_size, self.hparams.num_class_images)))
                for seed, image in zip(seeds, generate([self.hparams.class_prompt] * len(seeds), seeds),
                                       strict=True):
                    image.save(self.class_dir / f"class_{seed:05d}.png")
        self._attach_captions()
        return self.class_image_paths()

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self._attach_captions()

    def _attach_captions(self) -> None:
        """Wrap the parent's train/val image datasets into :class:`CaptionedDataset`; the train set gets the class
        images (DreamBooth) and stays unwrapped until they are all cached."""
        hp = self.hparams
        class_set = None
        if self.prior_preservation:
            paths = self.class_image_paths()
            if len(paths) >= hp.num_class_images and self.class_dir is not None:
                class_set = ImageFolderDataset(self.class_dir, paths, art_transform(hp.image_size, 3, hp.hflip),
                                               hp.image_size)
        for name in ("train_set", "val_set"):
            subset = getattr(self, name)
            if isinstance(subset.dataset, CaptionedDataset) and (name == "val_set" or not self.prior_preservation
                                                                 or subset.dataset.class_images is not None):
                continue
            if name == "train_set" and self.prior_preservation and class_set is None:
                continue
            base = subset.dataset.images if isinstance(subset.dataset, CaptionedDataset) else subset.dataset
            wrapped = CaptionedDataset(base, hp.instance_prompt, class_set if name == "train_set" else None,
                                       hp.class_prompt)
            setattr(self, name, Subset(wrapped, subset.indices))

    def train_dataloader(self) -> Any:
        train = self.train_set
        if self.prior_preservation and not (isinstance(train, Subset) and isinstance(train.dataset, CaptionedDataset)
                                            and train.dataset.class_images is not None):
            raise RuntimeError(f"{self.hparams.num_class_images} DreamBooth class images are needed in "
                               f"{self.class_dir}; call ensure_class_images(generate) first (the LoRA module does)")
        return super().train_dataloader()



def collate_check(batch: Any) -> tuple[torch.Tensor, list[str]]:
    """``(images, captions)`` of a captioned batch; raises ``TypeError`` for anything else."""
    if not isinstance(batch, list | tuple) or len(batch) < 2 or not isinstance(batch[1], list | tuple):
        raise TypeError("expected a captioned batch (images, captions[, class_images, class_captions]) from "
                        "CaptionedFolderDataModule (data=art_captions)")
    return batch[0], list(batch[1])
