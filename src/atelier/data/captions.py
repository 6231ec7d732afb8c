"""Captions of training images for text-to-image fine-tuning: sidecar ``.txt`` files, ``instance_prompt``
fallbacks, and the caption variation of LoRA training at scale (kohya's ``caption_dropout_rate``,
``shuffle_caption``, ``keep_tokens``) and ``repeats``.

Used by :mod:`atelier.data.captioned_folder` (the names are importable from there too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


def sidecar_of(path: Path) -> Path:
    """The caption file of the image at ``path``: ``<name>.txt`` beside it."""
    return path.with_suffix(".txt")


def has_sidecar_caption(path: Path) -> bool:
    """True when the image at ``path`` has a non-empty (after stripping) sidecar ``<name>.txt``."""
    sidecar = sidecar_of(path)
    return sidecar.is_file() and bool(sidecar.read_text(encoding="utf-8").strip())


def caption_for(path: Path, label: str, instance_prompt: str | None) -> str:
    """The caption of the image at ``path``: its sidecar ``<name>.txt`` (stripped) when present, else
    ``instance_prompt`` with ``{label}`` replaced by the image's subfolder name.

    Raises:
        ValueError: when there is neither a (non-empty) sidecar nor an ``instance_prompt``, naming the image.
    """
    sidecar = sidecar_of(path)
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8").strip()
        if text:
            return text
    if instance_prompt is None:
        raise ValueError(f"{path} has no caption: write {sidecar.name} beside it or set data.instance_prompt")
    return instance_prompt.replace("{label}", label)


@dataclass(frozen=True)
class CaptionOptions:
    """How training captions vary from step to step (kohya's ``caption_dropout_rate``, ``shuffle_caption``,
    ``keep_tokens``).

    Args:
        dropout: probability in ``[0, 1]`` that an instance caption is replaced by ``""`` (the unconditional
            prompt, so the adapter also learns the unconditional branch of classifier-free guidance). Applies to
            sidecar and ``instance_prompt`` captions alike, never to DreamBooth class captions.
        shuffle_tags: shuffle the comma-separated tags of *sidecar* captions (``instance_prompt`` captions are
            sentences and stay as they are).
        keep_tokens: the first ``keep_tokens`` tags stay in front, in order (e.g. a trigger word); kohya counts
            comma-separated tags as tokens.

    Raises:
        ValueError: for ``dropout`` outside ``[0, 1]`` or ``keep_tokens < 0``.
    """

    dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"data.caption_dropout must be in [0, 1], got {self.dropout}")
        if self.keep_tokens < 0:
            raise ValueError(f"data.keep_tokens must be >= 0, got {self.keep_tokens}")

    @property
    def varies(self) -> bool:
        """True when a caption can come out differently from step to step."""
        return self.dropout > 0 or self.shuffle_tags


def shuffle_tags(caption: str, keep_tokens: int = 0, generator: torch.Generator | None = None) -> str:
    """``caption`` split at commas into tags (stripped, empty ones dropped); the first ``keep_tokens`` tags kept
    in place, the rest permuted (``torch.randperm`` with ``generator``; ``None``: the global RNG); joined with
    ``", "``."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    order = torch.randperm(len(tail), generator=generator).tolist() if len(tail) > 1 else range(len(tail))
    return ", ".join(head + [tail[i] for i in order])


def process_caption(caption: str, options: CaptionOptions, sidecar: bool,
                    generator: torch.Generator | None = None) -> str:
    """One training draw of ``caption``: ``""`` with probability ``options.dropout`` (one ``torch.rand`` draw),
    else, for a ``sidecar`` caption with ``options.shuffle_tags``, its tags shuffled by :func:`shuffle_tags`.

    ``generator`` (CPU) makes the draws reproducible; ``None`` uses the global RNG, which DataLoader workers seed
    per worker."""
    if options.dropout > 0 and float(torch.rand((), generator=generator)) < options.dropout:
        return ""
    if options.shuffle_tags and sidecar:
        return shuffle_tags(caption, options.keep_tokens, generator)
    return caption


def check_repeats(repeats: int) -> None:
    """Raises ``ValueError`` for ``repeats < 1`` (config key ``data.repeats``)."""
    if repeats < 1:
        raise ValueError(f"data.repeats must be >= 1, got {repeats}")


def repeat_indices(indices: Sequence[int], repeats: int) -> list[int]:
    """``indices`` ``repeats`` times over, in order (each training image ``repeats`` times per epoch; kohya's
    repeats, for small folders).

    Raises:
        ValueError: for ``repeats < 1``.
    """
    check_repeats(repeats)
    return [i for _ in range(repeats) for i in indices]
