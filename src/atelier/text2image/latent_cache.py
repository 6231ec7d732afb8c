"""On-disk cache of VAE latents and text-encoder embeddings for LoRA / DreamBooth training (kohya's
``cache_latents``, ``cache_text_encoder_outputs``).

The VAE and text encoder are frozen, so a training image's latent distribution and a caption's hidden states never
change: encoding them once, before training, takes the VAE encoder and the text encoder out of every step (at 512 px
the VAE encoder costs about as much as a UNet forward).

* **Latents**: per image and crop, the VAE's latent *distribution* ``(2·C, h, w)`` (the mean and log-variance
  moments of ``AutoencoderKL.encode(x).latent_dist.parameters``, ``C = 4``, ``h = H / 8``), so every step still
  draws a fresh sample ``mean + std · ε`` exactly as a fresh encode would; with horizontal flips the flipped image is
  encoded too. An entry is keyed by the image file's resolved path, size in bytes and mtime, the crop (square size or
  bucket, and how it was fitted), whether it is flipped, and the model (:func:`model_fingerprint`: the resolved model
  directory, its VAE/text-encoder weight files' sizes and mtimes, the encoding dtype); any change re-encodes it.
* **Text embeddings**: per caption, the text encoder's last hidden states ``(max_length, hidden)``, keyed by the
  caption string and the model.

Layout: ``<cache_dir>/latents/<sha1>.safetensors`` and ``<cache_dir>/text/<sha1>.safetensors``; the sha1 is of the
key without the file's stat, so a changed file rewrites its own entry in place, and the full key (JSON) sits in the
safetensors metadata (``atelier_key``). Writes are atomic (temporary file + rename), so DDP ranks may fill one cache
together.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from atelier.utils.files import atomic_target

#: bump when what is cached changes, so that old entries are rebuilt
VERSION = 1
KEY_FIELD = "atelier_key"


def _stat(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def model_fingerprint(model_dir: str | Path, **extra: Any) -> str:
    """A string that changes when the model's encoders change: the resolved ``model_dir``, size and mtime of every
    weight file under ``vae/`` and ``text_encoder/`` (or, for the random-weight models, their marker file) and the
    ``extra`` settings (e.g. the encoding dtypes), as sorted JSON."""
    root = Path(model_dir).resolve()
    files: dict[str, dict[str, int]] = {}
    for sub in ("vae", "text_encoder"):
        for f in sorted((root / sub).glob("*")) if (root / sub).is_dir() else []:
            if f.suffix in (".safetensors", ".bin", ".json"):
                files[f"{sub}/{f.name}"] = _stat(f)
    for marker in sorted(root.glob("atelier_*.json")):
        files[marker.name] = _stat(marker)
    return json.dumps({"model": str(root), "files": files, **extra}, sort_keys=True)


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _write(path: Path, tensor: torch.Tensor, key: str) -> None:
    """Write ``tensor`` with ``key`` in the metadata to ``path`` atomically.

    Raises:
        OSError: when the cache folder cannot be written, naming it and the config key.
    """
    try:
        with atomic_target(path) as tmp:
            save_file({"value": tensor.detach().cpu().contiguous()}, tmp, metadata={KEY_FIELD: key})
    except OSError as err:
        raise OSError(f"cannot write the latent cache entry {path} ({err}); check data.latent_cache_dir, or set "
                      "data.cache_latents=false") from err


def _read(path: Path, key: str) -> torch.Tensor | None:
    """The tensor of ``path`` when it exists and was written for ``key``; ``None`` otherwise (missing, stale,
    damaged: the caller re-encodes)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get(KEY_FIELD) != key:
                return None
            return f.get_tensor("value")
    except (OSError, ValueError, RuntimeError, SafetensorError):  # missing, truncated, not a safetensors file
        return None


class LatentCache:
    """The cache of one model's latents and text embeddings under ``root`` (see the module docs).

    Args:
        root: the cache folder (config key ``data.latent_cache_dir``).
        model: the model's :func:`model_fingerprint`.
    """

    def __init__(self, root: str | Path, model: str) -> None:
        self.root = Path(root).expanduser()
        self.model = model

    # ------------------------------------------------------------------ latents
    def latent_key(self, source: str | Path, crop: Mapping[str, Any], flip: bool) -> tuple[Path, str]:
        """``(entry path, full key)`` of the latent of ``source`` fitted as ``crop`` (e.g. ``{"mode": "square",
        "size": [512, 512]}``), flipped or not.

        Raises:
            FileNotFoundError: when ``source`` does not exist.
        """
        path = Path(source).resolve()
        ident = {"source": str(path), "crop": dict(crop), "flip": bool(flip), "model": self.model,
                 "version": VERSION}
        entry = self.root / "latents" / f"{_sha1(json.dumps(ident, sort_keys=True))}.safetensors"
        return entry, json.dumps({**ident, "file": _stat(path)}, sort_keys=True)

    def load_latent(self, source: str | Path, crop: Mapping[str, Any], flip: bool) -> torch.Tensor | None:
        """The cached latent distribution ``(2·C, h, w)`` of ``source`` (dtype as encoded), or ``None`` when there is
        none for the file as it is now."""
        entry, key = self.latent_key(source, crop, flip)
        return _read(entry, key)

    def save_latent(self, source: str | Path, crop: Mapping[str, Any], flip: bool, value: torch.Tensor) -> None:
        """Store the latent distribution ``value`` ``(2·C, h, w)`` of ``source``."""
        entry, key = self.latent_key(source, crop, flip)
        _write(entry, value, key)

    # ------------------------------------------------------------------ text
    def text_key(self, caption: str) -> tuple[Path, str]:
        """``(entry path, full key)`` of the embedding of ``caption``."""
        key = json.dumps({"caption": caption, "model": self.model, "version": VERSION}, sort_keys=True)
        return self.root / "text" / f"{_sha1(key)}.safetensors", key

    def load_text(self, caption: str) -> torch.Tensor | None:
        """The cached hidden states ``(max_length, hidden)`` of ``caption``, or ``None``."""
        entry, key = self.text_key(caption)
        return _read(entry, key)

    def save_text(self, caption: str, value: torch.Tensor) -> None:
        """Store the hidden states ``value`` ``(max_length, hidden)`` of ``caption``."""
        entry, key = self.text_key(caption)
        _write(entry, value, key)
