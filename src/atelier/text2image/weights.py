"""Where Stable Diffusion weights come from: a local diffusers directory, the Hugging Face cache (hub id), or the
tiny random-weight model. Nothing is downloaded unless the hub is reachable and ``HF_HUB_OFFLINE`` is unset."""

from __future__ import annotations

import os
from pathlib import Path

from atelier.text2image.tiny import save_tiny_model

#: ``model_id`` value that selects the tiny random-weight model (tests and smoke runs only)
TINY = "tiny"
#: where ``model_id=tiny`` builds its model when no directory is given
DEFAULT_TINY_DIR = Path(os.environ.get("ATELIER_OUTPUT_DIR", "outputs")) / "tiny_sd"


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
        tiny_dir: where ``model_id=tiny`` lives (default :data:`DEFAULT_TINY_DIR`).

    Raises:
        MissingWeightsError: (a ``FileNotFoundError``) when the weights are not found; the message names the id,
            the local path tried, ``HF_HOME`` and ``HF_HUB_OFFLINE`` and says how to fix it.
        NotADirectoryError: when a local path exists but holds no ``model_index.json``.
    """
    model_id = str(model_id)
    if model_id == TINY:
        return save_tiny_model(tiny_dir or DEFAULT_TINY_DIR)
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
