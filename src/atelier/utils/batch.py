"""Small batch helpers used from configs."""

from typing import Any


def batch_size(batch: Any) -> int:
    """Number of images in a batch that is a tensor or an ``(images, labels)`` pair."""
    images = batch[0] if isinstance(batch, list | tuple) else batch
    return int(images.shape[0])
