"""The batches of :class:`atelier.data.captioned_folder.CaptionedFolderDataModule`, read the same way whatever their
kind: captioned tuples of images, or dicts of cached latents (and text embeddings).

Used by the LoRA module (:mod:`atelier.models.sd_lora`); the names are importable from
:mod:`atelier.data.captioned_folder` too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def collate_check(batch: Any) -> tuple[torch.Tensor, list[str]]:
    """``(images, captions)`` of a captioned batch; raises ``TypeError`` for anything else."""
    if not isinstance(batch, list | tuple) or len(batch) < 2 or not isinstance(batch[1], list | tuple):
        raise TypeError("expected a captioned batch (images, captions[, class_images, class_captions]) from "
                        "CaptionedFolderDataModule (data=art_captions)")
    return batch[0], list(batch[1])


def unpack_batch(batch: Any) -> dict[str, Any]:
    """A captioned batch of either kind as one dict: ``captions`` (list of B strings) and either ``pixels``
    ``(B, 3, H, W)`` or ``latents`` ``(B, 2·C, h, w)``; optionally ``text_embeddings`` ``(B, L, D)``, and for
    DreamBooth ``class_pixels``/``class_latents``, ``class_captions``, ``class_text_embeddings``.

    Raises:
        TypeError: for a batch that is neither a captioned tuple nor a cached-latents dict.
    """
    if isinstance(batch, Mapping):
        if "latents" not in batch or "caption" not in batch:
            raise TypeError(f"a cached batch needs 'latents' and 'caption', got keys {sorted(batch)}")
        out: dict[str, Any] = {"latents": batch["latents"], "captions": list(batch["caption"])}
        if "text_embedding" in batch:
            out["text_embeddings"] = batch["text_embedding"]
        if "class_latents" in batch:
            out["class_latents"] = batch["class_latents"]
            out["class_captions"] = list(batch["class_caption"])
            if "class_text_embedding" in batch:
                out["class_text_embeddings"] = batch["class_text_embedding"]
        return out
    images, captions = collate_check(batch)
    out = {"pixels": images, "captions": captions}
    if len(batch) == 4:
        out["class_pixels"] = batch[2]
        out["class_captions"] = list(batch[3])
    return out
