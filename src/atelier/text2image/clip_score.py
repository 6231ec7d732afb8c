"""CLIP score (Hessel et al. 2021) of generated images against their prompts, with torchmetrics' ``CLIPScore``.

torchmetrics 1.9 accepts only a few hub names as strings, and its feature code expects the tensors transformers 4
returned; so any CLIP (hub id or local directory such as the tiny model's ``clip/``) is passed as the
``(model, processor)`` factory that ``CLIPScore(model_name_or_path=...)`` also takes, with a thin ``CLIPModel``
subclass that returns tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from atelier.text2image.weights import hf_home

#: the CLIP model used when none is named and the pipeline is not the tiny model
DEFAULT_CLIP = "openai/clip-vit-base-patch16"


class _TensorFeaturesCLIP(CLIPModel):
    """``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected embeddings as a
    tensor ``(N, projection_dim)``: transformers 5 returns a ``BaseModelOutputWithPooling`` (embeddings in
    ``pooler_output``), which torchmetrics 1.9's CLIPScore cannot use."""

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _tensor(super().get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _tensor(super().get_text_features(*args, **kwargs))


def _tensor(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def make_clip_score(model: str | Path = DEFAULT_CLIP) -> CLIPScore:
    """A ``CLIPScore`` metric for ``model``: a hub id (from the ``HF_HOME`` cache, downloaded when online) or a
    local CLIP directory (``CLIPModel`` + ``CLIPProcessor`` saved with ``save_pretrained``).

    The model is handed to torchmetrics as the ``(model, processor)`` factory ``CLIPScore`` accepts, because its
    string form takes only a few hub names, and wrapped in :class:`_TensorFeaturesCLIP` for transformers 5.

    Raises:
        FileNotFoundError: when the weights are not found, naming ``model``, ``HF_HOME`` and ``HF_HUB_OFFLINE``.
    """
    name = str(Path(str(model)).expanduser()) if Path(str(model)).expanduser().exists() else str(model)

    def load() -> tuple[CLIPModel, CLIPProcessor]:
        return _TensorFeaturesCLIP.from_pretrained(name), CLIPProcessor.from_pretrained(name)

    try:
        return CLIPScore(model_name_or_path=load)
    except OSError as err:
        raise FileNotFoundError(
            f"clip_model={model}: CLIP weights not found (neither a local directory nor in the Hugging Face cache "
            f"HF_HOME={hf_home()}, HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}); download them where "
            "there is internet or pass a local CLIP directory"
        ) from err


@torch.no_grad()
def clip_scores(metric: CLIPScore, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Per-image CLIP score ``100 · max(cos(E_I, E_T), 0)``, in ``[0, 100]``.

    Args:
        metric: from :func:`make_clip_score`; it also accumulates the mean (``metric.compute()``).
        images: ``(N, 3, H, W)`` uint8 in ``[0, 255]``.
        prompts: ``N`` prompts, one per image.

    Returns:
        ``(N,)`` float32 on the CPU.

    Raises:
        ValueError: when ``images`` is not uint8 ``(N, 3, H, W)`` or the counts differ.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    device = next(metric.model.parameters()).device
    return torch.stack([metric(image[None].to(device), [prompt]).detach().float().cpu()
                        for image, prompt in zip(images, prompts, strict=True)])
