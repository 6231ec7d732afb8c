"""CPUTimeEstimate: one log line with the measured speed, the epoch and run estimates and the quick experiment."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from atelier.callbacks.cpu_estimate import CPUTimeEstimate, format_seconds
from atelier.callbacks.time_budget import TimeBudget


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(callbacks: list[L.Callback], **trainer_kwargs: object) -> None:
    loader = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=2)  # 32 batches per epoch
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(Tiny(), loader)


def test_logs_the_estimate_and_names_the_quick_experiment(caplog: pytest.LogCaptureFixture) -> None:
    cb = CPUTimeEstimate(skip_steps=2, measure_steps=5, hint_after_s=0.0, quick_experiments={"Tiny": "tiny_cpu"})
    with caplog.at_level(logging.INFO, logger="atelier.callbacks.cpu_estimate"):
        _fit([cb], max_epochs=3)
    assert cb.estimate is not None
    assert cb.estimate["steps_per_epoch"] == 32 and cb.estimate["steps_per_s"] > 0
    assert cb.estimate["epoch_s"] == pytest.approx(32 / cb.estimate["steps_per_s"])
    assert cb.estimate["run_s"] == pytest.approx(3 * cb.estimate["epoch_s"])  # max_epochs=3 ends first
    lines = [r for r in caplog.records if r.name == "atelier.callbacks.cpu_estimate"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "one epoch of 32 batches" in lines[0].getMessage() and "experiment=tiny_cpu" in lines[0].getMessage()


def test_fast_epochs_get_an_info_line_without_hint_and_max_steps_bounds_the_run(
        caplog: pytest.LogCaptureFixture) -> None:
    cb = CPUTimeEstimate(skip_steps=0, measure_steps=4, hint_after_s=1e9, quick_experiments={"Tiny": "tiny_cpu"})
    with caplog.at_level(logging.INFO, logger="atelier.callbacks.cpu_estimate"):
        _fit([cb], max_steps=8, max_epochs=-1)
    assert cb.estimate is not None
    assert cb.estimate["run_s"] == pytest.approx(8 / cb.estimate["steps_per_s"])
    (line,) = [r for r in caplog.records if r.name == "atelier.callbacks.cpu_estimate"]
    assert line.levelno == logging.INFO and "experiment=" not in line.getMessage()


def test_silent_with_a_time_budget() -> None:
    cb = CPUTimeEstimate(skip_steps=1, measure_steps=2)
    _fit([cb, TimeBudget(budget=60, margin_s=1, skip_steps=1, warmup_steps=2)], max_steps=6, max_epochs=-1)
    assert cb.estimate is None


def test_format_seconds_and_bad_arguments() -> None:
    assert format_seconds(40) == "40 s"
    assert format_seconds(725) == "12 min 5 s"
    assert format_seconds(6231) == "1 h 43 min"
    assert format_seconds(2 * 86400 + 3 * 3600 + 5) == "2 d 3 h"
    assert format_seconds(float("inf")) == "unbounded"
    with pytest.raises(ValueError, match="measure_steps"):
        CPUTimeEstimate(measure_steps=0)
