"""Class frequencies of a training split, and their copy in the checkpoint (``label_distribution=prior``)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Subset

#: checkpoint key of the ``(num_classes,)`` int64 training label counts (written by ``CheckpointExtras``)
LABEL_COUNTS_KEY = "atelier_label_counts"


def train_label_counts(datamodule: Any, num_classes: int) -> torch.Tensor:
    """``(num_classes,)`` int64 label counts of the datamodule's training split (``train_set``, a dataset or a
    ``Subset`` of one with a ``targets`` list/tensor, as torchvision's MNIST and Atelier's image folders have).

    Raises:
        ValueError: when the training split has no ``targets`` to count, or a label lies outside the classes.
    """
    train = getattr(datamodule, "train_set", None)
    indices = None
    while isinstance(train, Subset):
        indices = [int(i) for i in train.indices] if indices is None else [int(train.indices[i]) for i in indices]
        train = train.dataset
    targets = getattr(train, "targets", None)
    if targets is None:
        raise ValueError(f"label_distribution=prior needs the training labels, but "
                         f"{type(datamodule).__name__}.train_set has no targets; use label_distribution=balanced")
    targets = torch.as_tensor(targets, dtype=torch.long)
    if indices is not None:
        targets = targets[torch.as_tensor(indices, dtype=torch.long)]
    if targets.numel() == 0 or int(targets.min()) < 0 or int(targets.max()) >= num_classes:
        raise ValueError(f"training labels must lie in [0, {num_classes}); got {targets.unique().tolist()[:20]}")
    return torch.bincount(targets, minlength=num_classes)


def stored_label_counts(checkpoint: dict[str, Any]) -> torch.Tensor | None:
    """The ``(num_classes,)`` int64 training label counts stored in ``checkpoint`` (a loaded checkpoint dict);
    ``None`` for unconditional models and for checkpoints written before the counts were stored (stop 38)."""
    counts = checkpoint.get(LABEL_COUNTS_KEY)
    return None if counts is None else torch.as_tensor(counts, dtype=torch.long)
