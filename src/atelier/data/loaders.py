"""The DataLoader settings every Atelier datamodule shares."""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset


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
