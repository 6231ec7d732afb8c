"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
arXiv:2312.02696, Sec. 3): choose the EMA length of a finished run afterwards.

During training two (or more) power-function EMAs of the network, of relative standard deviations ``sigma_rels``
(e.g. 0.05 and 0.10), are snapshotted every ``snapshot_every_n_steps`` steps into ``<run>/posthoc_ema/``. After
training, :func:`synthesize_ema` solves for the weights of those snapshots (the paper's Alg. 3, a least-squares fit
of the power-function EMA profile) that best reproduce an EMA of any other ``sigma_rel``, and
:func:`apply_posthoc_ema` loads it into a model's EMA network: ``python sample.py ckpt_path=... ema_sigma_rel=0.1``.

The EMAs and the synthesis are ``ema_pytorch``'s ``PostHocEMA`` (``update_every=1``: Alg. 3 assumes an update
every step); this module is the Lightning glue: when to update and snapshot, resumption, where the files go.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from ema_pytorch import PostHocEMA
from torch import nn

log = logging.getLogger(__name__)

CONFIG_FILE = "posthoc_ema.json"


def _posthoc(net: nn.Module, folder: Path, sigma_rels: tuple[float, ...], dtype: torch.dtype) -> PostHocEMA:
    """``PostHocEMA`` updated every step, whose snapshots are written by the caller (``checkpoint()``)."""
    return PostHocEMA(net, sigma_rels=tuple(sigma_rels), checkpoint_every_num_steps="manual",
                      checkpoint_folder=str(folder), checkpoint_dtype=dtype, update_every=1)


class PostHocEMACallback(L.Callback):
    """Keep power-function EMAs of ``pl_module.<attribute>`` and snapshot them for post-hoc EMA synthesis.

    Args:
        sigma_rels: relative EMA lengths σ_rel of the tracked EMAs (at least two, distinct; the paper tracks 0.05
            and 0.10).
        snapshot_every_n_steps: optimiser steps between snapshots (the paper's ~4096 kimg spacing, scaled down
            here); a last snapshot is written when training ends.
        attribute: the module to average (``net`` for the DDPM, ``generator`` for the GAN).
        dirname: snapshot folder under the run directory (``trainer.default_root_dir``, or the checkpoint
            callback's parent directory).
        dtype: snapshot dtype, ``float32`` or ``float16``.

    Raises:
        ValueError: for fewer than two distinct ``sigma_rels``, a value outside ``(0, 0.28]`` (the power function
            needs γ > 0), or ``snapshot_every_n_steps < 1``.
        AttributeError: when the LightningModule has no ``attribute``.
    """

    def __init__(self, sigma_rels: tuple[float, ...] = (0.05, 0.10), snapshot_every_n_steps: int = 500,
                 attribute: str = "net", dirname: str = "posthoc_ema", dtype: str = "float32") -> None:
        sigma_rels = tuple(float(s) for s in sigma_rels)
        if len(set(sigma_rels)) < 2:
            raise ValueError(f"callbacks.posthoc_ema.sigma_rels needs at least two distinct values, got {sigma_rels}")
        if not all(0 < s <= 0.28 for s in sigma_rels):
            raise ValueError(f"callbacks.posthoc_ema.sigma_rels must lie in (0, 0.28], got {sigma_rels}")
        if snapshot_every_n_steps < 1:
            raise ValueError(f"callbacks.posthoc_ema.snapshot_every_n_steps must be >= 1, got {snapshot_every_n_steps}")
        if dtype not in ("float32", "float16"):
            raise ValueError(f"callbacks.posthoc_ema.dtype must be float32 or float16, got {dtype!r}")
        self.sigma_rels = sigma_rels
        self.every = int(snapshot_every_n_steps)
        self.attribute = attribute
        self.dirname = dirname
        self.dtype = getattr(torch, dtype)
        self.ema: PostHocEMA | None = None
        self.folder: Path | None = None
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.ema is not None:
            return
        net = getattr(pl_module, self.attribute, None)
        if not isinstance(net, nn.Module):
            raise AttributeError(f"callbacks.posthoc_ema.attribute={self.attribute!r}: "
                                 f"{type(pl_module).__name__} has no such module")
        self.folder = Path(trainer.default_root_dir) / self.dirname
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / CONFIG_FILE).write_text(json.dumps(
                {"sigma_rels": list(self.sigma_rels), "attribute": self.attribute,
                 "snapshot_every_n_steps": self.every}, indent=2))
        # snapshots are written by this callback (rank 0), not by PostHocEMA's own step counter
        self.ema = _posthoc(net, self.folder, self.sigma_rels, self.dtype)
        if self._pending is not None:
            self.ema.load_state_dict(self._pending)
            self._pending = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.ema is None or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        self.ema.update()
        if trainer.is_global_zero and int(self.ema.step) % self.every == 0:
            self.ema.checkpoint()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema is not None and trainer.is_global_zero and int(self.ema.step) % self.every:
            self.ema.checkpoint()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.ema is None else self.ema.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.ema is None:
            self._pending = state_dict
        else:
            self.ema.load_state_dict(state_dict)


def synthesize_ema(net: nn.Module, folder: str | Path, sigma_rel: float, step: int | None = None
                   ) -> dict[str, torch.Tensor]:
    """The state dict of the EMA of ``net`` with relative length ``sigma_rel``, synthesised from the snapshots in
    ``folder`` (Karras et al. 2024, Alg. 3 through ``ema_pytorch``), at training step ``step`` (default: the last).

    ``net`` gives the architecture only; its weights are not read or changed.

    Raises:
        FileNotFoundError: when ``folder`` has no ``posthoc_ema.json`` or no snapshots (train with
            ``callbacks=[default,posthoc_ema]``).
        ValueError: for ``sigma_rel`` outside ``(0, 0.28]``.
    """
    folder = Path(folder)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file() or not any(folder.glob("*.pt")):
        raise FileNotFoundError(f"no post-hoc EMA snapshots in {folder}: train with callbacks=[default,posthoc_ema] "
                                "to choose the EMA length afterwards")
    if not 0 < sigma_rel <= 0.28:
        raise ValueError(f"ema_sigma_rel must lie in (0, 0.28], got {sigma_rel}")
    sigma_rels = tuple(json.loads(config_file.read_text())["sigma_rels"])
    ema = _posthoc(net, folder, sigma_rels, torch.float32)
    synthesized = ema.synthesize_ema_model(sigma_rel=sigma_rel, step=step)
    return {k: v.float() for k, v in synthesized.ema_model.state_dict().items()}


def posthoc_folder(ckpt_path: str | Path, dirname: str = "posthoc_ema") -> Path:
    """The snapshot folder of the run that wrote ``ckpt_path``: ``<run>/checkpoints/x.ckpt`` → ``<run>/posthoc_ema``."""
    return Path(ckpt_path).expanduser().resolve().parent.parent / dirname


def apply_posthoc_ema(model: L.LightningModule, ckpt_path: str | Path, sigma_rel: float) -> None:
    """Replace ``model``'s EMA network (``model.ema.module``) by the post-hoc EMA of length ``sigma_rel``
    synthesised from the snapshots of the run that wrote ``ckpt_path``.

    Raises:
        FileNotFoundError: see :func:`synthesize_ema`.
        AttributeError: when ``model`` has no ``ema.module``.
    """
    folder = posthoc_folder(ckpt_path)
    attribute = json.loads((folder / CONFIG_FILE).read_text())["attribute"] if (folder / CONFIG_FILE).is_file() \
        else "net"
    target = getattr(getattr(model, "ema", None), "module", None)
    if target is None:
        raise AttributeError(f"{type(model).__name__} has no EMA network (model.ema.module) to replace")
    state = synthesize_ema(getattr(model, attribute), folder, sigma_rel)
    target.load_state_dict(state)
    log.info("EMA network replaced by the post-hoc EMA sigma_rel=%.3f from %s", sigma_rel, folder)
