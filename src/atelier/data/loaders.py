"""The DataLoader settings every Atelier datamodule shares."""

from __future__ import annotations

import operator

from torch.utils.data import DataLoader, Dataset


def check_loader_settings(batch_size: int, num_workers: int, image_size: int) -> None:
    """Check the settings every datamodule shares, at construction (before any data is read).

    Raises:
        ValueError: naming ``data.batch_size`` (≥ 1), ``data.num_workers`` (≥ 0) or ``data.image_size`` (≥ 1) and
            the value given.
    """
    for key, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                            ("image_size", image_size, 1)):
        try:
            ok = not isinstance(value, bool) and operator.index(value) >= low
        except TypeError:  # a float or a string
            ok = False
        if not ok:
            raise ValueError(f"data.{key}={value!r} is not allowed; it must be an integer >= {low}")


def make_loader(dataset: Dataset | None, batch_size: int, shuffle: bool, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader yielding ``(images, labels)`` batches; training loaders (``shuffle``) drop the last partial
    batch when the dataset holds more than one batch.

    Raises:
        RuntimeError: when ``dataset`` is ``None`` (the datamodule's ``setup()`` was not called).
    """
    if dataset is None:
        raise RuntimeError("the datamodule has no dataset yet: call setup() first")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle and len(dataset) > batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
