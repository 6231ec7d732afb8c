"""Where Stable Diffusion weights come from: a local diffusers directory, the Hugging Face cache (hub id), the
tiny random-weight model or the full-size random-weight SD 1.5 architecture. Nothing is downloaded unless the hub is
reachable and ``HF_HUB_OFFLINE`` is unset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from atelier.text2image.sd15 import SD15_RANDOM, build_sd15_random, is_sd15_random, save_sd15_random
from atelier.text2image.tiny import is_tiny, save_tiny_model

#: ``model_id`` value that selects the tiny random-weight model (tests and smoke runs only)
TINY = "tiny"
#: where ``model_id=tiny`` builds its model when no directory is given
DEFAULT_TINY_DIR = Path(os.environ.get("ATELIER_OUTPUT_DIR", "outputs")) / "tiny_sd"
#: ``model_id`` values of the random-weight models (never results: labelled ``random_weights: true``)
RANDOM_MODELS = (TINY, SD15_RANDOM)


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are neither a local directory nor in the Hugging Face cache."""


def hf_home() -> str:
    """The Hugging Face cache root (``$HF_HOME``, default ``~/.cache/huggingface``)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HOME", constants.HF_HOME)


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", ".", "~")) or model_id.count("/") != 1


def resolve_model(model_id: str, tiny_dir: str | Path | None = None) -> Path:
    """The local diffusers directory (with ``model_index.json``) for ``model_id``.

    Args:
        model_id: ``tiny`` (the random-weight test model, built in ``tiny_dir`` once), a local directory written
            by ``save_pretrained``, or a hub id ``owner/name`` (e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``)
            found in the Hugging Face cache or downloaded when online.
        tiny_dir: where ``model_id=tiny`` lives (default :data:`DEFAULT_TINY_DIR`); ``model_id=sd15_random``
            (the full-size SD 1.5 architecture with random weights, :mod:`atelier.text2image.sd15`: configs only,
            no weight files) lives beside it, in ``<tiny_dir>/../sd15_random``.

    Raises:
        MissingWeightsError: (a ``FileNotFoundError``) when the weights are not found; the message names the id,
            the local path tried, ``HF_HOME`` and ``HF_HUB_OFFLINE`` and says how to fix it.
        NotADirectoryError: when a local path exists but holds no ``model_index.json``.
    """
    model_id = str(model_id)
    if model_id == TINY:
        return save_tiny_model(tiny_dir or DEFAULT_TINY_DIR)
    if model_id == SD15_RANDOM:
        return save_sd15_random(Path(tiny_dir or DEFAULT_TINY_DIR).expanduser().parent / SD15_RANDOM)
    local = Path(model_id).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise NotADirectoryError(f"model_id={model_id}: {local.resolve()} is no diffusers pipeline directory "
                                     "(it has no model_index.json; write one with pipeline.save_pretrained)")
        return local
    hint = (f"model_id={model_id!r}: weights not found. Local path tried: {local.resolve()} (does not exist); "
            f"Hugging Face cache HF_HOME={hf_home()}, HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}. "
            "Fix: pass a local diffusers directory, or download the hub id on a machine with internet "
            "(huggingface-cli download <id>) into that HF_HOME, or use model_id=tiny for a random-weight test "
            "model.")
    if _looks_like_path(model_id):
        raise MissingWeightsError(hint)
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(model_id, local_files_only=hub_offline(),
                                     allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"])
    except Exception as err:  # offline, unknown id, gated repo, network error: one message with the fix
        raise MissingWeightsError(f"{hint} ({type(err).__name__}: {err})") from err
    path = Path(snapshot)
    if not (path / "model_index.json").is_file():
        raise MissingWeightsError(f"{hint} (the snapshot {path} has no model_index.json)")
    return path


def is_random_weights(path: str | Path) -> bool:
    """True for the directory of a random-weight model (``tiny`` or ``sd15_random``): its output is no result."""
    return is_tiny(path) or is_sd15_random(path)


def load_sd_pipeline(path: str | Path, torch_dtype: torch.dtype | None = None,
                     dtypes: dict[str, torch.dtype] | None = None) -> Any:
    """The SD 1.x/2.x ``StableDiffusionPipeline`` of the resolved directory ``path`` on the CPU, without a safety
    checker: ``from_pretrained`` for weights on disk, freshly built random components for ``sd15_random``.

    Args:
        path: a directory from :func:`resolve_model`.
        torch_dtype: dtype of all components (``None``: as stored, float32 for the random models).
        dtypes: per-component dtypes (``unet``, ``vae``, ``text_encoder``), overriding ``torch_dtype``; components
            are converted one at a time after loading.
    """
    from diffusers import StableDiffusionPipeline

    if is_sd15_random(path):
        return build_sd15_random(path, torch_dtype, dtypes)
    pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=torch_dtype)
    for name, dtype in (dtypes or {}).items():
        getattr(pipe, name).to(dtype)
    return pipe
