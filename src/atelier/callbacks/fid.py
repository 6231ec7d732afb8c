"""In-training FID/KID: every N epochs or steps, measure K samples against the datamodule's reference split.

Logs ``val/fid`` (and ``val/kid``, ``val/is``, ``val/class_coverage`` when computed) to the loggers at the
current global step (not subject to ``log_every_n_steps``) and through ``pl_module.log(..., logger=False)`` into
``trainer.callback_metrics``, so ``ModelCheckpoint(monitor="val/fid", mode="min")`` and sweeps
(``optimized_metric=val/fid``) can use them.
Reference statistics come from the cache (computed once). Under DDP only rank 0 samples and measures; the
values are broadcast so every rank logs the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import nn

from atelier.callbacks.every_n import EveryNSteps
from atelier.metrics.evaluator import Evaluator

log = logging.getLogger(__name__)

LOGGED = ("fid", "kid", "is", "precision", "recall", "class_coverage")


class FIDCallback(Callback):
    """FID/KID (Heusel et al. 2017; Bińkowski et al. 2018) of ``num_samples`` samples during training.

    Runs at the end of every ``every_n_epochs``-th training epoch, or, when ``every_n_steps > 0``, every
    ``every_n_steps`` optimiser steps instead. Works without a validation loop (GANs), because it hooks the
    training loop. Samples use a fixed seed, so successive values differ only through the model.

    Args:
        feature_extractor: an extractor module or its config (``configs/feature_extractor/*.yaml``;
            ``configs/callbacks/fid.yaml`` picks the one named after the data: ``mnist_classifier`` for
            ``data=mnist``, ``art_classifier`` for ``data=art``).
        metrics: subset of ``("fid", "kid", "is")``; logged as ``val/<name>``.
        every_n_epochs: interval in epochs (used when ``every_n_steps`` is 0).
        every_n_steps: interval in optimiser steps (0: use epochs).
        num_samples: generated images per evaluation (K).
        reference_split, reference_size, cache_dir, kid_subset_size, batch_size, seed: as in
            :class:`atelier.metrics.evaluator.Evaluator` (``kid_subset_size=None`` adapts to K).
        sample_kwargs: options for ``pl_module.sample`` (``sampler``, ``num_inference_steps``; others dropped).

    Raises:
        ValueError: without a feature extractor (data with no ``<data>_classifier`` option) or with neither
            interval set; at the first measurement, an extractor of another domain (``suite.check_domain``).
    """

    def __init__(self, feature_extractor: Mapping[str, Any] | nn.Module | None, metrics: Sequence[str] = ("fid", "kid"),
                 every_n_epochs: int = 1, every_n_steps: int = 0, num_samples: int = 1000,
                 reference_split: str | None = None, reference_size: int | None = 10000,
                 cache_dir: str | Path | None = None, kid_subset_size: int | None = None, batch_size: int = 250,
                 seed: int = 0, sample_kwargs: Mapping[str, Any] | None = None) -> None:
        if feature_extractor is None:
            raise ValueError("callbacks.fid has no feature extractor for this data (configs/callbacks/fid.yaml picks "
                             "<data choice>_classifier, which does not exist for it): choose one with "
                             "feature_extractor@callbacks.fid.feature_extractor=art_classifier | mnist_classifier | "
                             "inception")
        if every_n_epochs < 1 and every_n_steps < 1:
            raise ValueError("callbacks.fid: set every_n_epochs ≥ 1 or every_n_steps ≥ 1")
        self.feature_extractor = feature_extractor
        self.metric_names = list(metrics)
        self.every_n_epochs = every_n_epochs
        self.num_samples, self.reference_split, self.reference_size = num_samples, reference_split, reference_size
        self.cache_dir, self.kid_subset_size, self.batch_size, self.seed = cache_dir, kid_subset_size, batch_size, seed
        self.sample_kwargs = dict(sample_kwargs or {})
        self.evaluator: Evaluator | None = None
        self.history: list[dict[str, Any]] = []
        self._every = EveryNSteps(every_n_steps)

    @property
    def every_n_steps(self) -> int:
        """The interval in optimiser steps (``<= 0``: off); held by the :class:`EveryNSteps` that decides."""
        return self._every.n

    def _evaluator(self, trainer: Trainer, pl_module: LightningModule) -> Evaluator:
        if self.evaluator is None:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is None:
                raise RuntimeError("callbacks.fid needs the trainer's datamodule for reference images")
            reference_size = self.reference_size
            split_len = None
            if reference_size is not None:
                from atelier.metrics.cache import resolve_split

                split_len = len(resolve_split(datamodule, self.reference_split)[1])
                reference_size = min(reference_size, split_len)
            self.evaluator = Evaluator(self.feature_extractor, datamodule, self.metric_names, self.num_samples,
                                       self.reference_split, reference_size, self.cache_dir, self.kid_subset_size,
                                       batch_size=self.batch_size, seed=self.seed, device=pl_module.device)
        return self.evaluator

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self._every.fire(step):
            self._measure_and_log(trainer, pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_steps <= 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._measure_and_log(trainer, pl_module, on_step=False)

    def _measure_and_log(self, trainer: Trainer, pl_module: LightningModule, on_step: bool) -> None:
        values = torch.full((len(LOGGED),), float("nan"), dtype=torch.float64)
        if trainer.is_global_zero:
            result = self.measure(trainer, pl_module)
            values = torch.tensor([float(result["metrics"].get(k, float("nan"))) for k in LOGGED],
                                  dtype=torch.float64)
        # every rank waits here for rank 0's numbers (no other collective while rank 0 samples and measures)
        values = trainer.strategy.broadcast(values, src=0)
        logged = {f"val/{name}": v for name, v in zip(LOGGED, values.tolist(), strict=True) if v == v}  # not NaN
        if trainer.world_size > 1:
            log.info("rank %d, step %d: %s", trainer.global_rank, trainer.global_step,
                     ", ".join(f"{k}={v!r}" for k, v in logged.items()))
        for key, value in logged.items():
            # callback_metrics (checkpoint monitor, sweep objective) on every rank; loggers below, unthrottled
            pl_module.log(key, value, on_step=on_step, on_epoch=not on_step, sync_dist=False, logger=False,
                          prog_bar=key == "val/fid")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=trainer.global_step)

    @torch.no_grad()
    def measure(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """Evaluate ``pl_module`` now (this rank only) and remember the result in :attr:`history`."""
        evaluator = self._evaluator(trainer, pl_module)
        was_training = pl_module.training
        pl_module.eval()
        try:
            result = evaluator.evaluate(pl_module, self.sample_kwargs)
        finally:
            pl_module.train(was_training)
        result["step"] = trainer.global_step
        self.history.append(result)
        m = result["metrics"]
        log.info("step %d: %s (%d samples, %.3f s/image sampling)", trainer.global_step,
                 ", ".join(f"{k}={m[k]:.4g}" for k in LOGGED if k in m), self.num_samples,
                 result["timing"]["sampling_seconds_per_image"])
        return result
