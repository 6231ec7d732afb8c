"""Sweeps through the real entry point: an Optuna study (Atelier's sweeper, ``hydra/sweeper=atelier_optuna``) in
SQLite where failing trials (an exception, a NaN objective) are recorded as FAIL and the study goes on and can be
resumed; a study whose trials all fail ends with an error listing them; a real search config whose runs end
before their first validation still reports val/loss; the search-space parser; a submitit_local multirun of 2
jobs, each with its own directory and W&B run; train.py driven with the exact arguments a W&B sweep agent
passes."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from atelier.sweeps.optuna_sweeper import judge, make_sampler
from atelier.sweeps.search_space import SearchSpace, format_value
from atelier.utils.loggers import run_id
from tests.conftest import ROOT, load_script
from tests.scale_out_utils import run_train, tiny_args, train_env, wandb_run_ids

# The real sweeps' structure on a tiny space: lr=1e30 makes val/loss NaN, norm_num_groups=3 raises (16 channels).
# Random sampling with seed 6 (Optuna 4/5) draws (1e-3, 8), (1e30, 8), (*, 3): one trial of each kind.
TEST_SEARCH = """\
# @package _global_
defaults:
  - override /hydra/sweeper: atelier_optuna
  - override /hydra/sweeper/sampler: random
optimized_metric: val/loss
hydra:
  sweeper:
    storage: sqlite:///{db}
    study_name: tiny_study
    direction: minimize
    n_trials: {n_trials}
    n_jobs: 1
    max_failure_rate: 1.0
    sampler:
      seed: 6
    params:
      model.optimizer.lr: {lr}
      model.net.norm_num_groups: {groups}
"""
TINY_SWEEP = ["logger=csv", "trainer.max_steps=3", "trainer.max_epochs=-1", "trainer.val_check_interval=3",
              "trainer.check_val_every_n_epoch=null", "callbacks.sample_grid.on_train_end=false"]


def _search_args(tmp_path: Path, n_trials: int = 3, lr: str = "choice(1e-3, 1e30)",
                 groups: str = "choice(8, 3)") -> list[str]:
    """``-m hparams_search=tiny_search ...`` with the search config above written under ``tmp_path``."""
    search_dir = tmp_path / "configs" / "hparams_search"
    search_dir.mkdir(parents=True, exist_ok=True)
    (search_dir / "tiny_search.yaml").write_text(
        TEST_SEARCH.format(db=tmp_path / "study.db", n_trials=n_trials, lr=lr, groups=groups))
    # a searched key given on the command line would be a fixed parameter for the sweeper: leave it to the search
    tiny = [a for a in tiny_args("ddpm", *TINY_SWEEP) if not a.startswith("model.net.norm_num_groups=")]
    return ["-m", "hparams_search=tiny_search", f"hydra.searchpath=[file://{tmp_path / 'configs'}]", *tiny]


def _expected_state(params: dict) -> optuna.trial.TrialState:
    ok = params["model.net.norm_num_groups"] == 8 and params["model.optimizer.lr"] < 1
    return optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL


def test_optuna_sweep_records_failed_trials_in_sqlite_and_resumes(tmp_path: Path, mnist_available) -> None:
    db = tmp_path / "study.db"
    args = _search_args(tmp_path)
    proc = run_train([*args, f"hydra.sweep.dir={tmp_path / 'sweep'}"], train_env(tmp_path / "outputs"))
    # exit 0: the failures did not stop the study

    study = optuna.load_study(study_name="tiny_study", storage=f"sqlite:///{db}")
    assert len(study.trials) == 3
    kinds = set()
    for trial in study.trials:
        assert trial.state == _expected_state(trial.params), (trial.number, trial.params, trial.state)
        kinds.add("raise" if trial.params["model.net.norm_num_groups"] == 3
                  else "nan" if trial.params["model.optimizer.lr"] > 1 else "ok")
    assert kinds == {"ok", "nan", "raise"}  # one trial trained, one diverged (NaN val/loss), one raised
    assert "training diverged): trial failed" in proc.stdout
    ok = next(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    job = tmp_path / "sweep" / str(ok.number)
    assert ok.value == json.loads((job / "metrics.json").read_text())["val/loss"]
    assert study.best_trial.number == ok.number
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.FAIL:  # why, kept in the study
            expected = ("norm_num_groups=3" if trial.params["model.net.norm_num_groups"] == 3
                        else "training diverged): trial failed")
            assert expected in trial.user_attrs["fail_reason"], trial.user_attrs
        assert Path(trial.user_attrs["output_dir"]) == tmp_path / "sweep" / str(trial.number)
    results = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert results.best_value == ok.value and results.best_params == ok.params and results.best_trial == ok.number
    assert dict(results.trials) == {"COMPLETE": 1, "FAIL": 2}

    # resume: the same command with the same SQLite file adds trials to the same study
    run_train([*args, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'sweep2'}"],
              train_env(tmp_path / "outputs"))
    study = optuna.load_study(study_name="tiny_study", storage=f"sqlite:///{db}")
    assert len(study.trials) == 4
    assert study.trials[-1].state == _expected_state(study.trials[-1].params)


def test_optuna_study_where_every_trial_fails_exits_with_the_trials_and_reasons(tmp_path: Path,
                                                                               mnist_available) -> None:
    # norm_num_groups 3 and 5 do not divide 16 channels: every trial raises while the model is built
    args = _search_args(tmp_path, n_trials=2, lr="1e-3", groups="choice(3, 5)")
    proc = run_train([*args, f"hydra.sweep.dir={tmp_path / 'sweep'}"], train_env(tmp_path / "outputs"), check=False)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "Record does not exist" not in proc.stdout
    assert "StudyFailedError: study 'tiny_study'" in proc.stdout and "none completed" in proc.stdout
    study = optuna.load_study(study_name="tiny_study", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    for trial in study.trials:
        groups = trial.params["model.net.norm_num_groups"]
        reason = trial.user_attrs["fail_reason"]
        assert reason.startswith("InstantiationException") and f"multiples of norm_num_groups={groups}" in reason
        job = tmp_path / "sweep" / str(trial.number)
        line = f"  trial {trial.number} {{'model.net.norm_num_groups': {groups}}} in {job}: {reason}"
        assert line in proc.stdout, (line, proc.stdout[-3000:])  # number, params, job directory, why it failed
    assert not (tmp_path / "sweep" / "optimization_results.yaml").exists()


def test_ddpm_optuna_trials_that_end_before_validation_still_report_val_loss(tmp_path: Path,
                                                                             mnist_available) -> None:
    # the real search config; 3 steps is far below the first scheduled validation (end of epoch 1)
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", "hparams_search=ddpm_optuna", "hydra.sweeper.n_trials=2", "trainer.max_steps=3",
                      *tiny_args("ddpm", "logger=csv", "callbacks.sample_grid.on_train_end=false"),
                      f"hydra.sweep.dir={sweep}"], train_env(tmp_path / "outputs"))
    study = optuna.load_study(study_name="ddpm_optuna",
                              storage=f"sqlite:///{tmp_path / 'outputs' / 'optuna' / 'ddpm_optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert proc.stdout.count("one final validation") == 2
    for trial in study.trials:
        metrics = json.loads((sweep / str(trial.number) / "metrics.json").read_text())
        assert metrics["global_step"] == 3 and "train/loss" in metrics
        assert trial.value == metrics["val/loss"] and math.isfinite(trial.value)
        # data.batch_size=8 on the command line fixes the searched key: not sampled
        assert set(trial.params) == {"model.optimizer.lr", "model.optimizer.weight_decay",
                                     "model.lr_scheduler.num_warmup_steps"}
    assert OmegaConf.load(sweep / "optimization_results.yaml").best_value == study.best_value


def test_gan_optuna_on_paintings_optimises_the_painting_fid(tmp_path: Path, art_available) -> None:
    # the brief's `python train.py -m model=gan data=art hparams_search=gan_optuna`, one tiny trial: its objective
    # is the FID on the painting classifier's features (3 artists), not on the digit classifier's
    sweep, outputs = tmp_path / "sweep", tmp_path / "outputs"
    tiny = [a for a in tiny_args("gan", "logger=csv", "callbacks.sample_grid.on_train_end=false",
                                 "callbacks.fid.num_samples=20", "callbacks.fid.reference_size=40",
                                 "callbacks.fid.batch_size=20") if not a.startswith("data.val_size=")]  # MNIST's
    proc = run_train(["-m", "data=art", "hparams_search=gan_optuna", "hydra.sweeper.n_trials=1", "trainer.max_steps=2",
                      *tiny, f"hydra.sweep.dir={sweep}"], train_env(outputs))
    stats = list((outputs / "reference_stats").glob("*.pt"))
    assert [p.name.split("_")[:3] for p in stats] == [["ArtFolderDataModule", "train-40", "art"]], proc.stdout[-2000:]
    study = optuna.load_study(study_name="gan_optuna", storage=f"sqlite:///{outputs / 'optuna' / 'gan_optuna.db'}")
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert study.trials[0].value == metrics["val/fid"] and math.isfinite(metrics["val/fid"])
    # class coverage over the painting classifier's 3 artists (k/3), not over 10 digits
    assert round(metrics["val/class_coverage"] * 3, 4) in (1.0, 2.0, 3.0)


def test_search_space_maps_override_grammar_to_optuna_distributions() -> None:
    space = SearchSpace.from_config(
        {"lr": "tag(log, interval(1e-4, 1e-2))", "dropout": "interval(0, 0.5)", "steps": "range(100, 400, 100)",
         "width": "tag(int, interval(8, 64))", "down": "range(10, 0, -2)", "loss": "choice(hinge, 'non saturating')",
         "channels": "choice([16,32], [32,64])", "groups": "choice(8, 16)", "seed": 3},
        ["groups=4", "~callbacks.fid", "+extra=x", "scale=0.5,1.0"])  # the command line comes last and wins
    d = space.distributions
    assert d["lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert d["dropout"] == FloatDistribution(0.0, 0.5)
    assert d["steps"] == IntDistribution(100, 300, step=100)  # stop excluded, as in Hydra
    assert d["width"] == IntDistribution(8, 64)
    assert d["down"] == IntDistribution(2, 10, step=2)
    assert d["loss"] == CategoricalDistribution(["hinge", "non saturating"])
    assert d["channels"] == CategoricalDistribution(["[16,32]", "[32,64]"])
    assert d["scale"] == CategoricalDistribution([0.5, 1.0])
    assert set(d) == {"lr", "dropout", "steps", "width", "down", "loss", "channels", "scale"}
    assert list(space.fixed.values()) == ["seed=3", "groups=4", "~callbacks.fid", "+extra=x"]
    assert space.overrides({"loss": "non saturating", "channels": "[32,64]", "lr": 0.001}) == [
        "seed=3", "groups=4", "~callbacks.fid", "+extra=x", "loss=non\\ saturating", "channels=[32,64]", "lr=0.001"]
    assert format_value("1") == "'1'" and format_value(True) == "true" and format_value(None) == "null"
    with pytest.raises(ValueError, match="unknown tag"):
        SearchSpace.from_config({"lr": "tag(logg, interval(1e-4, 1e-2))"}, [])
    with pytest.raises(ValueError, match="is empty"):
        SearchSpace.from_config({"n": "range(5, 5)"}, [])


def test_trial_outcomes_and_resumed_sampler_seed() -> None:
    def ret(value: object, status: JobStatus = JobStatus.COMPLETED) -> JobReturn:
        job = JobReturn(status=status)
        job.return_value = value
        return job

    assert judge(ret(0.5)).value == 0.5 and judge(ret(0.5)).reason is None
    assert "returned None" in judge(ret(None)).reason
    assert judge(ret(float("nan"))).reason == "the job returned nan"
    assert judge(ret(float("inf"))).reason == "the job returned inf"
    assert judge(ret(ValueError("boom"), JobStatus.FAILED)).reason == "ValueError: boom"
    # a resumed study with 4 trials seeds its sampler with seed + 4: it does not draw the first trials again
    def first_draw(sampler: optuna.samplers.BaseSampler) -> float:
        study = optuna.create_study(sampler=sampler)
        return study.ask({"x": FloatDistribution(0.0, 1.0)}).params["x"]

    factory = functools.partial(optuna.samplers.RandomSampler, seed=6)
    assert first_draw(make_sampler(factory, 4)) == first_draw(optuna.samplers.RandomSampler(seed=10))
    assert first_draw(make_sampler(factory, 0)) == first_draw(optuna.samplers.RandomSampler(seed=6))
    assert first_draw(make_sampler(factory, 4)) != first_draw(make_sampler(factory, 0))


def test_submitit_local_multirun_two_jobs_own_dirs_and_wandb_runs(tmp_path: Path, mnist_available) -> None:
    sweep = tmp_path / "sweep"
    run_train(["-m", "launcher=submitit_local", *tiny_args("ddpm", "logger=[wandb,csv]", "trainer.max_steps=2",
                                                           "trainer.max_epochs=-1"),
               "seed=1,2", f"hydra.sweep.dir={sweep}"], train_env(tmp_path / "outputs"))
    assert list((sweep / ".submitit").glob("*/*_result.pkl")), "submitit did not run the jobs"
    ids = set()
    for job, seed in (("0", 1), ("1", 2)):
        d = sweep / job
        assert json.loads((d / "metrics.json").read_text())["global_step"] == 2
        assert OmegaConf.load(d / ".hydra" / "config.yaml").seed == seed
        assert wandb_run_ids(d) == {run_id(d)}
        ids |= wandb_run_ids(d)
    assert len(ids) == 2  # each job its own W&B run


def _agent_args(sweep_cfg: dict) -> list[str]:
    """``${args_no_hyphens}`` as the W&B agent builds it: one ``key=value`` per parameter (a value from each)."""
    args = []
    for key, spec in sweep_cfg["parameters"].items():
        value = spec["values"][0] if "values" in spec else spec["min"]
        args.append(f"{key}={value}")
    return args


def test_wandb_agent_command_form_drives_train_py(tmp_path: Path, mnist_available) -> None:
    sweep_cfg = yaml.safe_load((ROOT / "configs" / "sweeps" / "wandb_ddpm.yaml").read_text())
    assert sweep_cfg["program"] == "train.py" and sweep_cfg["metric"]["name"] == "val/loss"
    agent = _agent_args(sweep_cfg)
    command = []
    for part in sweep_cfg["command"]:
        if part == "${env}":
            command.append("/usr/bin/env")
        elif part == "${interpreter}":
            command.append(sys.executable)
        elif part == "${program}":
            command.append(str(ROOT / "train.py"))
        elif part == "${args_no_hyphens}":
            command.extend(agent)
        else:
            command.append(part)
    assert command[:3] == ["/usr/bin/env", sys.executable, str(ROOT / "train.py")]
    # the agent's own arguments, then (same key=value form) what makes the run tiny for the test
    run_dir = tmp_path / "run"
    extra = tiny_args("ddpm", "trainer.max_steps=2", "trainer.val_check_interval=2", "data.val_size=64",
                      f"hydra.run.dir={run_dir}")
    extra = [a for a in extra if not a.startswith(("model=", "data.batch_size="))]
    env = train_env(tmp_path / "outputs", WANDB_RUN_ID="agentrun123")
    proc = subprocess.run([*command, *extra], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert cfg.task_name == "ddpm_mnist_cpu"  # experiment=ddpm_mnist_cpu from the sweep's command
    for arg in agent:
        key, value = arg.split("=", 1)
        assert str(OmegaConf.select(cfg, key)) == str(yaml.safe_load(value)), arg
    assert wandb_run_ids(run_dir) == {"agentrun123"}  # the agent's run, not a new one
    assert "val/loss" in json.loads((run_dir / "metrics.json").read_text())
    assert os.environ.get("WANDB_RUN_ID") is None  # the test did not leak the agent's variable


def test_sweeper_settings_are_checked_and_a_stored_study_keeps_its_direction(tmp_path: Path) -> None:
    from atelier.sweeps.optuna_sweeper import OptunaSweep

    def sweep(**changes: object) -> OptunaSweep:
        settings = {"sampler": None, "direction": "minimize", "storage": f"sqlite:///{tmp_path / 'db' / 's.db'}",
                    "study_name": "s", "n_trials": 1, "n_jobs": 1, "max_failure_rate": 1.0, "params": None}
        return OptunaSweep(**{**settings, **changes})

    for bad in ({"direction": "up"}, {"n_jobs": 0}, {"max_failure_rate": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sweep(**bad)
    assert sweep().open_study().direction == optuna.study.StudyDirection.MINIMIZE  # creates db/ and the study
    assert sweep(direction="MINIMIZE").open_study().study_name == "s"  # loads it
    with pytest.raises(ValueError, match="was created to minimize, not maximize"):
        sweep(direction="maximize").open_study()


def test_study_table_lists_best_complete_trial_first_then_failures(tmp_path: Path, capsys) -> None:
    module = load_script("study_table")
    db = tmp_path / "s.db"
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{db}", direction="minimize")
    for value in (3.0, 1.5):
        trial = study.ask({"model.optimizer.lr": FloatDistribution(1e-5, 1e-2, log=True)})
        study.tell(trial, value)
    failed = study.ask({"model.optimizer.lr": FloatDistribution(1e-5, 1e-2, log=True)})
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    columns, rows = module.study_rows(str(db), None)
    assert columns == ["trial", "state", "value", "seconds", "model.optimizer.lr"]
    assert [(r["trial"], r["state"], r["value"]) for r in rows] == [(1, "COMPLETE", 1.5), (0, "COMPLETE", 3.0),
                                                                    (2, "FAIL", None)]
    out_csv = tmp_path / "t.csv"
    assert module.main([str(db), "--csv", str(out_csv)]) == 0
    assert out_csv.read_text().splitlines()[1].startswith("1,COMPLETE,1.5,")
    assert module.main([str(tmp_path / "missing.db")]) == 2
    assert "no study file" in capsys.readouterr().err
