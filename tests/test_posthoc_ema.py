"""Post-hoc EMA: snapshots written by the callback in a real Lightning fit, synthesis checked against an EMA
tracked directly at the asked length, resumption, and the sample task's ``ema_sigma_rel``."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from ema_pytorch import KarrasEMA
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from atelier.callbacks.posthoc_ema import PostHocEMACallback, posthoc_folder, synthesize_ema
from atelier.tasks import sample as sample_task
from atelier.tasks import train as train_task
from tests.conftest import TINY_DDPM, compose_cfg


class Drift(L.LightningModule):
    """One weight that SGD(lr=1) on ``loss = -w`` moves by +1 per step (w_t = t), and a directly tracked
    power-function EMA of length ``sigma_rel`` to compare the synthesis with."""

    def __init__(self, sigma_rel: float) -> None:
        super().__init__()
        self.net = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.net.weight)
        self.tracked = KarrasEMA(self.net, sigma_rel=sigma_rel, update_every=1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return -self.net.weight.sum() + 0 * batch[0].sum()

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.tracked.update()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=1.0)


def _fit(root: Path, steps: int, module: L.LightningModule, callback: PostHocEMACallback,
         ckpt_path: str | None = None, checkpoint: bool = False) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root), enable_checkpointing=checkpoint,
                        callbacks=[callback])
    data = DataLoader(TensorDataset(torch.zeros(1000, 1)), batch_size=1)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def _weight(state: dict[str, torch.Tensor]) -> float:
    return float(next(v for k, v in state.items() if k.endswith("weight")))


def test_synthesis_matches_an_ema_tracked_at_that_length(tmp_path: Path) -> None:
    steps = 300
    module = Drift(sigma_rel=0.075)
    _fit(tmp_path, steps, module, PostHocEMACallback((0.05, 0.10), snapshot_every_n_steps=20))
    folder = tmp_path / "posthoc_ema"
    assert json.loads((folder / "posthoc_ema.json").read_text())["sigma_rels"] == [0.05, 0.10]
    assert len(list(folder.glob("*.pt"))) == 2 * steps // 20
    assert module.net.weight.item() == pytest.approx(steps)  # the raw weight is untouched: w_t = t
    tracked = float(module.tracked.ema_model.weight)
    synthesized = _weight(synthesize_ema(module.net, folder, sigma_rel=0.075))
    assert synthesized == pytest.approx(tracked, abs=0.1), (synthesized, tracked)
    # and it is a different average from the two stored lengths (0.05 is longer-tailed towards t)
    short, long = (_weight(synthesize_ema(module.net, folder, s)) for s in (0.05, 0.10))
    assert long + 3 < synthesized < short - 3, (long, synthesized, short)
    # an earlier step of the same run
    assert _weight(synthesize_ema(module.net, folder, 0.075, step=steps // 2)) < synthesized - 100


def test_resume_continues_the_same_emas(tmp_path: Path) -> None:
    full = Drift(0.1)
    _fit(tmp_path / "full", 40, full, cb_full := PostHocEMACallback((0.05, 0.10), snapshot_every_n_steps=10))
    half = Drift(0.1)
    _fit(tmp_path / "run", 20, half, PostHocEMACallback((0.05, 0.10), snapshot_every_n_steps=10), checkpoint=True)
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    resumed = Drift(0.1)
    _fit(tmp_path / "run", 40, resumed, cb_res := PostHocEMACallback((0.05, 0.10), snapshot_every_n_steps=10),
         ckpt_path=str(ckpt))
    assert cb_full.ema is not None and cb_res.ema is not None
    assert int(cb_res.ema.step) == int(cb_full.ema.step) == 40
    for a, b in zip(cb_full.ema.state_dict().values(), cb_res.ema.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    assert len(list((tmp_path / "run" / "posthoc_ema").glob("*.pt"))) == 8


def test_bad_arguments_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="two distinct"):
        PostHocEMACallback((0.1, 0.1))
    with pytest.raises(ValueError, match=r"\(0, 0.28\]"):
        PostHocEMACallback((0.05, 0.5))
    with pytest.raises(ValueError, match="snapshot_every_n_steps"):
        PostHocEMACallback(snapshot_every_n_steps=0)
    with pytest.raises(AttributeError, match="generator"):
        _fit(tmp_path, 2, Drift(0.1), PostHocEMACallback(attribute="generator"))
    with pytest.raises(FileNotFoundError, match="callbacks=\\[default,posthoc_ema\\]"):
        synthesize_ema(nn.Linear(1, 1), tmp_path / "nothing", 0.1)


def test_sample_task_uses_a_post_hoc_ema_length(train_cfg, tmp_path: Path, mnist_available) -> None:
    cfg = train_cfg("data.image_size=8", "trainer.limit_train_batches=6", "trainer.max_steps=6",
                    "trainer.limit_val_batches=1", "data.val_size=64", "callbacks=[default,posthoc_ema]",
                    "callbacks.posthoc_ema.snapshot_every_n_steps=2", "export_pipeline=false")
    train_task.run(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert len(list(posthoc_folder(ckpt).glob("*.pt"))) == 6  # 2 EMAs x snapshots at steps 2, 4, 6
    plain = sample_task.load_module(ckpt)
    posthoc = sample_task.load_module(ckpt, ema_sigma_rel=0.2)
    a, b = plain.ema.module.conv_in.weight, posthoc.ema.module.conv_in.weight
    assert a.shape == b.shape and not torch.allclose(a, b)
    torch.testing.assert_close(plain.net.conv_in.weight, posthoc.net.conv_in.weight)  # raw weights kept
    scfg = compose_cfg("sample", [f"ckpt_path={ckpt}", "num_samples=4", "num_inference_steps=2",
                                  "ema_sigma_rel=0.2"], tmp_path / "sample")
    assert sample_task.run(scfg)["shape"] == [4, 1, 8, 8]
    # a run without snapshots says how to get them
    bare = compose_cfg("train", [*TINY_DDPM, "logger=csv", "print_config=false", "data.num_workers=0",
                                 "data.batch_size=8", "data.image_size=8", "trainer.max_steps=1",
                                 "trainer.limit_val_batches=1", "data.val_size=64", "export_pipeline=false",
                                 "callbacks.sample_grid.num_samples=4"], tmp_path / "bare")
    train_task.run(bare)
    with pytest.raises(FileNotFoundError, match="posthoc_ema"):
        sample_task.load_module(Path(bare.paths.output_dir) / "checkpoints" / "last.ckpt", ema_sigma_rel=0.1)
