"""Extra state in every checkpoint: the model config (for ``sample.py``), the training label counts of a
class-conditional model (``sample.py label_distribution=prior``) and the RNG states (exact resume)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer

from atelier.data.label_counts import LABEL_COUNTS_KEY, train_label_counts

CONFIG_KEY = "atelier_config"
RNG_KEY = "atelier_rng"


class CheckpointExtras(Callback):
    """Store ``config`` (a plain, resolved dict with at least ``model``), the ``(num_classes,)`` int64 training
    label counts of a class-conditional module (``num_classes`` an int; counted once from the datamodule's
    ``train_set.targets``, skipped when it has none) and the CPU/CUDA/NumPy/Python RNG states in each checkpoint;
    restore the RNG states on resume so that noise draws and data order continue as in an uninterrupted run."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = config or {}
        self._label_counts: torch.Tensor | None = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config
        counts = self._counts(trainer, pl_module)
        if counts is not None:
            checkpoint[LABEL_COUNTS_KEY] = counts
        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[RNG_KEY] = rng

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get(RNG_KEY)
        if not rng:
            return
        torch.set_rng_state(rng["torch"])
        n = rng["numpy"]
        np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        state = rng["python"]
        random.setstate((state[0], tuple(state[1]), state[2]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _counts(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor | None:
        classes = getattr(pl_module, "num_classes", None)
        if self._label_counts is None and isinstance(classes, int):
            try:
                self._label_counts = train_label_counts(getattr(trainer, "datamodule", None), classes)
            except ValueError:  # no targets to count (e.g. a dataloader passed without a datamodule)
                return None
        return self._label_counts


def _numpy_state() -> dict[str, Any]:
    """NumPy's global RNG state as tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
    _, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}
