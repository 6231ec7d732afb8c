"""The wall-clock training budget: horizon maths, the stretched LR schedule, the callback's checkpoint state, and
tiny real DDPM/GAN runs on MNIST that end on time with an LR decayed to ~0."""

from __future__ import annotations

import csv
import functools
import itertools
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from diffusers.optimization import get_scheduler
from lightning import Callback, LightningModule, Trainer
from omegaconf import DictConfig, open_dict

from atelier.callbacks.time_budget import TimeBudget, parse_duration
from atelier.models.optim import Horizon, find_horizon, horizon_scheduler
from atelier.tasks import train as train_task
from tests.conftest import compose_cfg

BUDGET_S = 8.0
# what a real run may spend past its budget: the last step and the end-of-training hooks
SLACK_S = 2.0
# a cosine schedule (peak LR 1e-3, 10 warm-up steps: _budget_args) for the tiny DDPM
DDPM_ARGS = ["model.lr_scheduler.name=cosine", "model.optimizer.lr=1e-3"]
# the same for the GAN's two optimisers (its config has no schedule)
GAN_COSINE = ("model.lr_scheduler={_target_:diffusers.optimization.get_scheduler,_partial_:true,name:cosine,"
              "num_warmup_steps:10}")


# ---------------------------------------------------------------- helpers for the end-to-end runs
class SlowDown(Callback):
    """Sleep ``delay_s`` after every batch from global step ``after_step`` on (another job taking the CPU)."""

    def __init__(self, after_step: int, delay_s: float) -> None:
        self.after_step, self.delay_s = after_step, delay_s

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step >= self.after_step:
            time.sleep(self.delay_s)


class StopAfter(Callback):
    """Stop training cleanly ``seconds`` after it started (a preempted job that checkpointed)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._start = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if time.monotonic() - self._start >= self.seconds:
            trainer.should_stop = True


def _budget_args(budget: float = BUDGET_S, lr_warmup: int = 10) -> list[str]:
    return ["callbacks=[default,time_budget]", f"callbacks.time_budget.budget={budget}",
            "callbacks.time_budget.margin_s=1.0", "callbacks.time_budget.skip_steps=3",
            "callbacks.time_budget.warmup_steps=10", "callbacks.time_budget.reestimate_every=0.1",
            "trainer.max_time=00:00:00:30", "trainer.log_every_n_steps=1", "data.image_size=16",
            "data.val_size=64", "trainer.limit_val_batches=1", "export_pipeline=false",
            "callbacks.model_checkpoint.every_n_train_steps=null", "callbacks.sample_grid.on_train_end=false",
            f"model.lr_scheduler.num_warmup_steps={lr_warmup}"]


def _csv_column(out: Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` for every row of the run's CSV log that has ``key``."""
    with open(out / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def _budget_state(ckpt: Path) -> dict[str, Any]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"]
    return next(v for k, v in state.items() if k.startswith("TimeBudget"))


def _with_output_dir(cfg: DictConfig, out: Path) -> DictConfig:
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def _assert_lr_decays_to_zero(lrs: list[tuple[int, float]], warmup: int, peak: float,
                               last_plan_steps: int | None = None) -> None:
    """The LR warms up to ``peak``, never rises after, and its last value (the last optimiser step's, one step
    before the horizon) is near zero. A plan re-made ``last_plan_steps`` steps before the end compresses the
    rest of the cosine into those steps; its last step then sits at progress ≥ (N − 1) / N, which bounds the
    last LR by peak · ½(1 + cos(π (N − 1) / N)) (e.g. 15 % of peak for N = 4) instead of 2 %."""
    after = [lr for step, lr in lrs if step >= warmup]
    assert len(after) > 20, lrs
    assert max(after) == pytest.approx(peak, rel=0.02)  # the warm-up reached the peak
    for a, b in itertools.pairwise(after):
        assert b <= a + 1e-12, f"the LR rose after the warm-up: {a} -> {b}"
    bound = 0.02
    if last_plan_steps is not None and last_plan_steps > 0:
        bound = max(bound, 0.5 * (1 + math.cos(math.pi * (last_plan_steps - 1) / last_plan_steps)) + 1e-6)
    assert after[-1] < bound * peak, f"last LR {after[-1]} of peak {peak} (bound {bound:.3f} of peak)"


# ---------------------------------------------------------------- units
def test_parse_duration() -> None:
    assert parse_duration("00:00:18:30") == 1110.0
    assert parse_duration("01:02:03:04") == 86400 + 2 * 3600 + 3 * 60 + 4
    assert parse_duration(8) == 8.0 and parse_duration("7.5") == 7.5
    assert parse_duration({"minutes": 2}) == 120.0
    for bad in ("18:30", "soon", 0, -1.0, True):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_callback_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="margin_s"):
        TimeBudget(10, margin_s=10)
    with pytest.raises(ValueError, match="warmup_steps"):
        TimeBudget(60, warmup_steps=0)
    with pytest.raises(ValueError, match="reestimate_every"):
        TimeBudget(60, reestimate_every=2.0)


def test_horizon_fixed_is_linear_progress() -> None:
    h = Horizon()
    assert h.progress(50, start=10) == 0.0  # unknown horizon: no progress
    h.move(110, step=10)
    for k in (10, 35, 60, 109, 110, 200):
        assert h.progress(k, start=10) == pytest.approx(min((k - 10) / 100, 1.0))
    assert h.move(5, step=20) == 21  # never behind the current step


def test_horizon_moves_are_continuous_and_monotone() -> None:
    rng = random.Random(0)
    h = Horizon()
    start, step, prev = 20, 0, 0.0
    for _ in range(30):
        step += rng.randint(1, 40)
        before = h.progress(step, start)
        h.move(step + rng.randint(1, 400), step)
        assert h.progress(step, start) == pytest.approx(before, abs=1e-12)  # no jump where the horizon moves
        assert before >= prev - 1e-12
        prev = before
    ks = range(0, h.total + 5)
    ps = [h.progress(k, start) for k in ks]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(ps))
    assert ps[h.total] == pytest.approx(1.0) and ps[h.total - 1] < 1.0
    # the horizon's state is plain data and restores in place
    other = Horizon()
    other.load_state_dict(h.state_dict())
    assert [other.progress(k, start) for k in ks] == ps


def _run_schedule(horizon: Horizon, moves: dict[int, int], steps: int, warmup: int, name: str = "cosine",
                  lr: float = 0.1) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    factory = functools.partial(get_scheduler, name=name, num_warmup_steps=warmup)
    sched = horizon_scheduler(opt, factory, horizon)
    lrs = []
    for k in range(steps):
        if k in moves:
            horizon.move(moves[k], k)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_stretched_cosine_equals_diffusers_for_a_fixed_horizon() -> None:
    lrs = _run_schedule(Horizon(), {0: 200}, 200, warmup=20)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    ref_sched = get_scheduler("cosine", opt, num_warmup_steps=20, num_training_steps=200)
    ref = []
    for _ in range(200):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        ref_sched.step()
    assert lrs == pytest.approx(ref, abs=1e-9)


def test_stretched_cosine_never_rises_after_warmup_and_ends_at_zero() -> None:
    # first estimate during the warm-up, then the machine slows down (horizon shrinks) and speeds up (grows)
    h = Horizon()
    lrs = _run_schedule(h, {15: 600, 120: 350, 200: 420, 300: 380}, 400, warmup=50)
    assert lrs[:50] == pytest.approx([0.1 * k / 50 for k in range(50)])
    after = lrs[50:]
    assert max(after) == pytest.approx(0.1)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(after))
    assert 0 < lrs[379] < 1e-3 * 0.1 and lrs[380:] == [0.0] * 20  # zero from the last planned step on
    # the warm-up-free linear schedule too
    lin = _run_schedule(Horizon(), {0: 100, 40: 80}, 100, warmup=0, name="linear")
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(lin)) and lin[79] < 0.1 * 0.02


def test_state_dict_round_trip(tmp_path: Path) -> None:
    cb = TimeBudget("00:00:01:00", margin_s=5)
    cb._elapsed_before = 12.5
    cb.horizon.move(400, 60)
    cb.horizon.move(380, 120)
    path = tmp_path / "state.pt"
    torch.save({"cb": cb.state_dict()}, path)
    state = torch.load(path, weights_only=True)["cb"]
    assert state == {"elapsed_s": 12.5, "budget_s": 60.0, "horizon": {"total": 380, "history": [[60, 400],
                                                                                                 [120, 380]]}}
    fresh = TimeBudget(60, margin_s=5)
    horizon = fresh.horizon
    fresh.load_state_dict(state)
    assert fresh.horizon is horizon  # restored in place: a schedule built before sees it
    assert fresh.horizon.total == 380 and fresh.horizon.history == [(60, 400), (120, 380)]
    assert fresh.elapsed_s == 12.5 and fresh.remaining_s == pytest.approx(60 - 5 - 12.5)


def test_find_horizon_reads_the_trainers_callbacks() -> None:
    cb = TimeBudget(60)
    trainer = Trainer(accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    assert find_horizon(trainer) is cb.horizon
    assert find_horizon(Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)) is None


# ---------------------------------------------------------------- the quick experiments
@pytest.mark.parametrize(("experiment", "budget_s", "scheduled"), [
    ("ddpm_mnist_cpu", 1110.0, True), ("ddpm_cond_mnist_cpu", 1110.0, True),
    ("gan_mnist_cpu", 1080.0, False), ("vae_mnist_cpu", 1080.0, True),
])
def test_quick_experiments_stop_on_their_budget(experiment: str, budget_s: float, scheduled: bool,
                                                tmp_path: Path) -> None:
    cfg = compose_cfg("train", [f"experiment={experiment}"], tmp_path)
    assert cfg.trainer.max_steps == -1 and cfg.trainer.max_epochs == -1  # no fixed length left
    budget = hydra.utils.instantiate(cfg.callbacks.time_budget)
    assert isinstance(budget, TimeBudget) and budget.budget_s == budget_s
    assert budget.budget_s < parse_duration(cfg.trainer.max_time) <= budget.budget_s + 60  # the hard stop
    # the budget stays when the callbacks group is chosen on the command line
    assert "time_budget" in compose_cfg("train", [f"experiment={experiment}", "callbacks=[default,perf]"],
                                        tmp_path).callbacks
    if scheduled:  # its LR schedule follows the callback's horizon: warm-up, then cosine to 0 at the horizon
        model = hydra.utils.instantiate(cfg.model)
        model.trainer = Trainer(accelerator="cpu", callbacks=[budget], logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
        scheduler = model.configure_optimizers()["lr_scheduler"]["scheduler"]
        warmup = cfg.model.lr_scheduler.num_warmup_steps
        budget.horizon.move(5000, warmup)
        assert scheduler.lr_lambdas[0](warmup) == 1.0
        assert scheduler.lr_lambdas[0](warmup + (5000 - warmup) // 2) == pytest.approx(0.5)
        assert scheduler.lr_lambdas[0](5000) == 0.0


# ---------------------------------------------------------------- end to end, real MNIST
@pytest.mark.slow
def test_tiny_ddpm_ends_within_budget_with_lr_at_zero(train_cfg: Callable[..., DictConfig], mnist_available) -> None:
    cfg = train_cfg(*_budget_args(), *DDPM_ARGS, "trainer.max_epochs=3", "trainer.max_steps=100000")
    metrics = train_task.run(cfg)
    out = Path(cfg.paths.output_dir)
    state = _budget_state(out / "checkpoints" / "last.ckpt")
    # the fixed length was replaced by the budget, and the run stopped at its planned horizon
    total = state["horizon"]["total"]
    assert metrics["global_step"] == total
    assert metrics["train/budget_horizon"] == total
    assert len(state["horizon"]["history"]) >= 3, state  # first estimate + re-estimates
    # it spent its budget (minus the 1 s margin), no more
    assert BUDGET_S - 1.0 - SLACK_S < state["elapsed_s"] < BUDGET_S + SLACK_S, state
    _assert_lr_decays_to_zero(_csv_column(out, "lr"), warmup=10, peak=1e-3)
    horizons = _csv_column(out, "train/budget_horizon")
    assert horizons and horizons[-1][1] == total


@pytest.mark.slow
def test_horizon_shrinks_when_steps_slow_down(train_cfg: Callable[..., DictConfig], mnist_available) -> None:
    cfg = train_cfg(*_budget_args(), *DDPM_ARGS,
                    "+callbacks.slow._target_=tests.test_time_budget.SlowDown",
                    "+callbacks.slow.after_step=30", "+callbacks.slow.delay_s=0.15")
    metrics = train_task.run(cfg)
    out = Path(cfg.paths.output_dir)
    state = _budget_state(out / "checkpoints" / "last.ckpt")
    history = state["horizon"]["history"]
    last = history[-1][1]
    assert history[0][0] < 30 < history[-1][0]  # estimated before the slow-down, then re-estimated after it
    # the plan shrinks below the largest made before the slow-down (the first estimate alone can be low on a slow
    # machine, whose warm-up steps weigh more: CI at stop 32 saw 64, then 71 and 48 after the slow-down)
    before = max(total for step, total in history if step < 30)
    assert last < 0.8 * before, history
    assert metrics["global_step"] == last
    assert state["elapsed_s"] < BUDGET_S + SLACK_S, state
    # the slow-down may leave the last re-plan only a few steps (CI, stop 32: last LR 3.8 % of peak)
    _assert_lr_decays_to_zero(_csv_column(out, "lr"), warmup=10, peak=1e-3,
                              last_plan_steps=history[-1][1] - history[-1][0])


@pytest.mark.slow
def test_tiny_gan_counts_d_and_g_steps(train_cfg: Callable[..., DictConfig], mnist_available) -> None:
    args = [a for a in _budget_args() if not a.startswith("model.lr_scheduler")]
    cfg = train_cfg(*args, GAN_COSINE, "model.optimizer_g.lr=1e-3", "model.optimizer_d.lr=1e-3", model="gan")
    metrics = train_task.run(cfg)
    out = Path(cfg.paths.output_dir)
    state = _budget_state(out / "checkpoints" / "last.ckpt")
    total = state["horizon"]["total"]
    # global_step counts the D and the G step of every batch; the run stops at the first batch reaching the plan
    assert total <= metrics["global_step"] <= total + 1 and metrics["global_step"] % 2 == 0
    assert len(state["horizon"]["history"]) >= 3
    assert BUDGET_S - 1.0 - SLACK_S < state["elapsed_s"] < BUDGET_S + SLACK_S, state
    assert _csv_column(out, "train/budget_horizon")[-1][1] == total
    assert _csv_column(out, "train/d_loss") and _csv_column(out, "train/g_loss")
    for key in ("lr_g", "lr_d"):  # both schedules end at the budget's last step
        _assert_lr_decays_to_zero(_csv_column(out, key), warmup=10, peak=1e-3)


@pytest.mark.slow
def test_resume_continues_the_same_budget(tmp_path: Path, train_cfg: Callable[..., DictConfig],
                                          mnist_available) -> None:
    args = [*_budget_args(), *DDPM_ARGS]
    first = _with_output_dir(train_cfg(*args, "+callbacks.stop._target_=tests.test_time_budget.StopAfter",
                                       "+callbacks.stop.seconds=3.5"), tmp_path / "first")
    train_task.run(first)
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    stopped = _budget_state(ckpt)
    stop_step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    used = stopped["elapsed_s"]
    assert 3.5 <= used < 3.5 + SLACK_S, stopped
    assert stopped["horizon"]["total"] > stop_step, stopped  # stopped mid-plan

    resumed = _with_output_dir(train_cfg(*args, f"ckpt_path={ckpt}"), tmp_path / "resumed")
    start = time.monotonic()
    metrics = train_task.run(resumed)
    wall = time.monotonic() - start
    final = _budget_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    # the same budget: about BUDGET_S of training in both runs together, so this one trained only for what was left
    assert BUDGET_S - 1.0 - SLACK_S < final["elapsed_s"] < BUDGET_S + SLACK_S, final
    assert wall < BUDGET_S - used + 15, wall  # data setup, validation and teardown included
    # the plan went on: the first run's horizon moves are kept, new ones come after the resume step
    history = [tuple(h) for h in final["horizon"]["history"]]
    before = [tuple(h) for h in stopped["horizon"]["history"]]
    assert history[:len(before)] == before and all(s >= stop_step for s, _ in history[len(before):])
    assert metrics["global_step"] == final["horizon"]["total"]
    # the LR goes on exactly where the saved plan puts it (no new warm-up), never rises, and ends at ~0
    saved = Horizon()
    saved.load_state_dict(stopped["horizon"])
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * saved.progress(stop_step, start=10)))
    lrs = _csv_column(tmp_path / "resumed", "lr")
    assert lrs[0] == (stop_step, pytest.approx(expected, rel=1e-6))
    assert lrs[0][1] <= _csv_column(tmp_path / "first", "lr")[-1][1]
    assert all(b <= a + 1e-12 for (_, a), (_, b) in itertools.pairwise(lrs))
    assert lrs[-1][1] < 0.02 * 1e-3


def test_explicit_max_steps_caps_the_plan(train_cfg, mnist_available) -> None:
    """`experiment=ddpm_mnist_cpu trainer.max_steps=N` (a debug run, a short sweep trial) stops at N, not at the
    budget: the user's number wins."""
    from atelier.tasks import train as train_task

    cfg = train_cfg("callbacks=[default,time_budget]", "callbacks.time_budget.budget=600", "trainer.max_time=null",
                    "callbacks.time_budget.skip_steps=1", "callbacks.time_budget.warmup_steps=2",
                    "data.image_size=8", "trainer.max_steps=6", "trainer.max_epochs=-1", "trainer.limit_val_batches=0",
                    "export_pipeline=false", "callbacks.sample_grid.on_train_end=false")
    metrics = train_task.run(cfg)
    assert metrics["global_step"] == 6
