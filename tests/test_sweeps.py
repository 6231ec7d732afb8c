"""Sweeps through the real entry point: an Optuna study in SQLite where failing trials (an exception, a NaN
objective) are recorded as FAIL and the study goes on and can be resumed; a submitit_local multirun of 2 jobs,
each with its own directory and W&B run; train.py driven with the exact arguments a W&B sweep agent passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import yaml
from omegaconf import OmegaConf

from atelier.utils.loggers import run_id
from tests.conftest import ROOT
from tests.scale_out_utils import run_train, tiny_args, train_env, wandb_run_ids

# The real sweeps' structure on a tiny space: lr=1e30 makes val/loss NaN, norm_num_groups=3 raises (16 channels).
# Random sampling with seed 6 draws (1e-3, 8), (1e30, 8), (*, 3): one trial of each kind. (Not the grid sampler:
# hydra-optuna-sweeper 1.3 crashes when the grid's last trial fails, as GridSampler then calls study.stop().)
TEST_SEARCH = """\
# @package _global_
defaults:
  - override /hydra/sweeper: optuna
  - override /hydra/sweeper/sampler: random
optimized_metric: val/loss
hydra:
  sweeper:
    storage: sqlite:///{db}
    study_name: tiny_study
    direction: minimize
    n_trials: 3
    n_jobs: 1
    max_failure_rate: 1.0
    sampler:
      seed: 6
    params:
      model.optimizer.lr: choice(1e-3, 1e30)
      model.net.norm_num_groups: choice(8, 3)
"""


def _expected_state(params: dict) -> optuna.trial.TrialState:
    ok = params["model.net.norm_num_groups"] == 8 and params["model.optimizer.lr"] < 1
    return optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL


def test_optuna_sweep_records_failed_trials_in_sqlite_and_resumes(tmp_path: Path, mnist_available) -> None:
    db = tmp_path / "study.db"
    search_dir = tmp_path / "configs" / "hparams_search"
    search_dir.mkdir(parents=True)
    (search_dir / "tiny_search.yaml").write_text(TEST_SEARCH.format(db=db))
    tiny = tiny_args("ddpm", "logger=csv", "trainer.max_steps=3", "trainer.max_epochs=-1",
                     "trainer.val_check_interval=3", "trainer.check_val_every_n_epoch=null",
                     "callbacks.sample_grid.on_train_end=false")
    # a searched key given on the command line would be a fixed parameter for the sweeper: leave it to the search
    tiny = [a for a in tiny if not a.startswith("model.net.norm_num_groups=")]
    args = ["-m", "hparams_search=tiny_search", f"hydra.searchpath=[file://{tmp_path / 'configs'}]", *tiny]
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
    assert (tmp_path / "sweep" / "optimization_results.yaml").exists()

    # resume: the same command with the same SQLite file adds trials to the same study
    run_train([*args, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'sweep2'}"],
              train_env(tmp_path / "outputs"))
    study = optuna.load_study(study_name="tiny_study", storage=f"sqlite:///{db}")
    assert len(study.trials) == 4
    assert study.trials[-1].state == _expected_state(study.trials[-1].params)


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
