"""Scale-out building blocks without training: global batch size, checkpoint discovery for auto-resume, W&B run
ids, the sweep objective, and the sweep / launcher / trainer configs as composed by Hydra."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from atelier.tasks.train import metric_value
from atelier.utils.batching import apply_global_batch_size, derive_batching, world_size
from atelier.utils.hydra_jobs import register_resolvers
from atelier.utils.loggers import run_id, wandb_logger
from atelier.utils.ranks import is_launch_rank_zero
from atelier.utils.resume import checkpoint_candidates, resolve_ckpt_path
from tests.conftest import CONFIGS, compose_cfg

register_resolvers()


# ---------------------------------------------------------------- global batch size
def test_derive_batching_splits_global_batch() -> None:
    b = derive_batching(256, 4)
    assert (b.micro_batch_size, b.accumulate_grad_batches) == (64, 1)
    b = derive_batching(256, 4, micro_batch_size=16)
    assert (b.micro_batch_size, b.accumulate_grad_batches) == (16, 4)
    assert b.micro_batch_size * b.accumulate_grad_batches * b.world_size == 256


@pytest.mark.parametrize(("args", "message"), [
    ((250, 4, None), r"global_batch_size=250 is not divisible by trainer.devices × trainer.num_nodes = 4"),
    ((256, 4, 48), r"64 images per device, not divisible by micro_batch_size=48; choose one of \[1, 2, 4, 8, 16"),
    ((0, 1, None), r"global_batch_size=0 is not allowed"),
    ((64, 1, 0), r"micro_batch_size=0 is not allowed"),
])
def test_derive_batching_errors_name_the_keys(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        derive_batching(*args)


def test_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert world_size(2, 1, "cpu") == 2
    assert world_size([0, 1, 2, 3], 2, "gpu") == 8
    assert world_size(-1, 1, "cpu") == 1
    assert world_size("auto", 3, "gpu") == 3 * max(1, torch.cuda.device_count())
    with pytest.raises(ValueError, match=r"trainer.devices='two' is not allowed"):
        world_size("two", 1)
    with pytest.raises(ValueError, match=r"trainer.num_nodes=0 is not allowed"):
        world_size(1, 0)
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_JOB_NAME", "atelier")
    assert world_size(-1, 2, "gpu") == 16  # srun started the processes: SLURM knows


def test_global_batch_size_sets_data_and_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    cfg = compose_cfg("train", ["trainer=ddp_sim", "global_batch_size=64", "micro_batch_size=8"], tmp_path)
    split = apply_global_batch_size(cfg)
    assert split is not None and split.world_size == 2
    assert cfg.data.batch_size == 8 and cfg.trainer.accumulate_grad_batches == 4
    cfg = compose_cfg("train", ["trainer=ddp_sim", "global_batch_size=63"], tmp_path)
    with pytest.raises(ValueError, match="global_batch_size=63 is not divisible"):
        apply_global_batch_size(cfg)
    cfg = compose_cfg("train", [], tmp_path)
    assert apply_global_batch_size(cfg) is None and cfg.data.batch_size == 128


def test_gan_refuses_gradient_accumulation(train_cfg, mnist_available) -> None:
    from atelier.tasks import train as train_task

    cfg = train_cfg("global_batch_size=16", "micro_batch_size=8", "debug=fdr", model="gan")
    with pytest.raises(ValueError, match=r"trainer.accumulate_grad_batches=2 is not allowed for GAN"):
        train_task.run(cfg)


# ---------------------------------------------------------------- auto-resume
def _ckpt(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.ones(2)}}, path)
    return path


def test_resolve_ckpt_path_finds_newest_readable(tmp_path: Path) -> None:
    assert resolve_ckpt_path(None, "auto", tmp_path) == (None, None)  # fresh directory
    _ckpt(tmp_path / "checkpoints" / "step_0000010.ckpt", 10)
    time.sleep(0.01)
    hpc = _ckpt(tmp_path / "hpc_ckpt_1.ckpt", 17)  # Lightning's SLURM requeue checkpoint
    assert resolve_ckpt_path(None, "auto", tmp_path) == (str(hpc), 17)
    time.sleep(0.01)
    last = _ckpt(tmp_path / "checkpoints" / "last.ckpt", 20)
    assert checkpoint_candidates(tmp_path)[0].name == "last.ckpt"
    assert resolve_ckpt_path(None, "auto", tmp_path) == (str(last), 20)
    # a checkpoint cut short by kill -9 while being written is skipped
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    os.utime(last)
    assert resolve_ckpt_path(None, "auto", tmp_path) == (str(hpc), 17)
    assert resolve_ckpt_path(None, "never", tmp_path) == (None, None)
    assert resolve_ckpt_path("/some/explicit.ckpt", "auto", tmp_path) == ("/some/explicit.ckpt", None)
    with pytest.raises(ValueError, match=r"resume='always' is not allowed; choose one of \['auto', 'never'\]"):
        resolve_ckpt_path(None, "always", tmp_path)


def test_launch_rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert is_launch_rank_zero()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert is_launch_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a child started by Lightning's DDP launcher
    assert not is_launch_rank_zero()


# ---------------------------------------------------------------- W&B run id
def test_wandb_run_id_is_deterministic_per_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_id(a) == run_id(str(a)) == run_id(tmp_path / "x" / ".." / "a")
    assert run_id(a) != run_id(b) and len(run_id(a)) == 16
    assert wandb_logger(str(a)).version == run_id(a)
    monkeypatch.setenv("WANDB_RUN_ID", "fromagent")  # a W&B sweep agent's run wins
    assert wandb_logger(str(b)).version == "fromagent"
    assert wandb_logger(str(b), id="explicit").version == "explicit"


# ---------------------------------------------------------------- sweep objective
def test_metric_value_fails_trials_in_sweeps() -> None:
    assert metric_value({"val/loss": 0.5}, "val/loss", strict=True) == 0.5
    assert metric_value({}, None, strict=True) is None
    assert metric_value({}, "val/fid") is None  # a plain run only warns
    assert math.isnan(metric_value({"val/loss": float("nan")}, "val/loss"))
    with pytest.raises(ValueError, match=r"optimized_metric='val/loss' is nan \(training diverged\)"):
        metric_value({"val/loss": float("nan")}, "val/loss", strict=True)
    assert metric_value({"val/loss": 1.0}, "val/fid", strict=True) is None  # the sweeper records FAIL


# ---------------------------------------------------------------- configs
def _compose_with_hydra(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(("search", "experiment", "metric", "target"), [
    ("ddpm_optuna", "ddpm_mnist_cpu", "val/loss", "atelier.models.ddpm.DDPM"),
    ("gan_optuna", "gan_mnist_cpu", "val/fid", "atelier.models.gan.GAN"),
    ("vae_optuna", "vae_mnist_cpu", "val/loss", "atelier.models.vae.VAE"),
])
def test_hparams_search_configs(search: str, experiment: str, metric: str, target: str, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_OUTPUT_DIR", str(tmp_path / "outputs"))
    cfg = _compose_with_hydra([f"experiment={experiment}", f"hparams_search={search}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert cfg.optimized_metric == metric and cfg.model._target_ == target
    assert sweeper.max_failure_rate == 1.0 and sweeper.study_name == search
    assert sweeper.storage == f"sqlite:///{tmp_path / 'outputs' / 'optuna'}/{search}.db"
    assert (tmp_path / "outputs" / "optuna").is_dir()  # created for SQLite by ${atelier.mkdir:...}
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None or key.endswith("gamma"), key
    if search == "gan_optuna":
        assert "fid" in cfg.callbacks


def test_slurm_launcher_config_makes_the_sbatch_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import submitit

    cfg = _compose_with_hydra(["launcher=slurm", "trainer=ddp", "hydra.launcher.gpus_per_node=4",
                               "hydra.launcher.nodes=2", "hydra.launcher.partition=gpu",
                               "hydra.launcher.timeout_min=90"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["tasks_per_node"] == 4 and launcher["cpus_per_task"] == 8
    HydraConfig.instance().set_config(cfg)  # as in the job: ${hydra:launcher.*} resolves
    try:
        assert cfg.trainer.devices == 4 and cfg.trainer.num_nodes == 2 and cfg.trainer.strategy == "ddp"
    finally:
        HydraConfig.instance().cfg = None
    # the sbatch script submitit writes from these settings, mapped as hydra-submitit-launcher maps them
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # submitit insists on srun
    base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
            "stderr_to_stdout"}
    params = {k if k in base else f"slurm_{k}": v for k, v in launcher.items()
              if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit",
                                     slurm_max_num_timeout=launcher["max_num_timeout"])
    executor.update_parameters(**params)
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in ("--partition=gpu", "--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=8",
                 "--mem=64GB", "--time=90", "--signal=USR2@120", "--requeue"):
        assert f"#SBATCH {line}" in script, (line, script)
    # one signal, submitit's own (its handler requeues; Lightning's auto-requeue is off): no USR1 line beside it
    assert script.count("--signal=") == 1, script
    assert "export WANDB_MODE=" in script


def test_the_briefs_hydra_launcher_spelling_is_the_same_slurm_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    # `python train.py -m experiment=ddpm_art hydra/launcher=slurm trainer=ddp`: Hydra's own group name selects the
    # launcher settings that launcher=slurm selects; trainer=ddp follows the allocation (SLURM_NNODES in the job)
    fixed = "hydra.sweep.dir=sweep"  # the default holds the time to the second, which two composes may straddle
    brief = _compose_with_hydra(["experiment=ddpm_art", "hydra/launcher=slurm", "trainer=ddp", fixed])
    ours = _compose_with_hydra(["experiment=ddpm_art", "launcher=slurm", "trainer=ddp", fixed])
    assert brief.hydra.launcher == ours.hydra.launcher
    assert brief.hydra.launcher._target_.endswith("SlurmLauncher") and brief.hydra.launcher.signal_delay_s == 120
    assert brief.model.net.block_out_channels == [64, 128, 256, 256] and brief.data.image_size == 64
    assert brief.trainer.strategy == "ddp" and brief.trainer.devices == -1  # the GPUs SLURM makes visible
    assert brief.trainer.num_nodes == 1
    monkeypatch.setenv("SLURM_NNODES", "3")  # resolved when the job reads it, inside the allocation
    assert brief.trainer.num_nodes == 3


def test_local_launchers_and_ddp_trainers_compose() -> None:
    cfg = _compose_with_hydra(["launcher=submitit_local"])
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher")
    cfg = _compose_with_hydra(["launcher=local"])
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")
    cfg = _compose_with_hydra(["trainer=ddp_sim"])
    assert cfg.trainer.devices == 2 and cfg.trainer.strategy.process_group_backend == "gloo"
    cfg = _compose_with_hydra(["trainer=ddp"])
    assert cfg.trainer.sync_batchnorm is True and cfg.trainer.precision == "bf16-mixed"


# ---------------------------------------------------------------- throughput / memory summary
def test_perf_callback_writes_images_per_second(train_cfg, mnist_available) -> None:
    from atelier.tasks import train as train_task

    cfg = train_cfg("callbacks=[default,perf]", "callbacks.perf.warmup_steps=1", "data.image_size=8",
                    "trainer.max_steps=3", "trainer.limit_val_batches=0", "export_pipeline=false",
                    "callbacks.sample_grid.on_train_end=false")
    train_task.run(cfg)
    perf = json.loads((Path(cfg.paths.output_dir) / "perf.json").read_text())
    assert perf["batches"] == 2 and perf["images_per_s"] > 0 and perf["world_size"] == 1
    assert perf["peak_allocated_gib"] is None  # CPU: no CUDA memory to report
    # model FLOPs of the counted warm-up batch = the network's forward + backward on a batch of that size
    import hydra
    from torch.utils.flop_counter import FlopCounterMode

    model = hydra.utils.instantiate(cfg.model)
    b = int(cfg.data.batch_size)
    with FlopCounterMode(display=False) as counter:
        model.diffusion_loss(torch.randn(b, 1, 8, 8)).backward()
    assert perf["flops_per_batch"] == counter.get_total_flops() > 0
    assert perf["flops_per_image"] == round(perf["flops_per_batch"] / b)
    assert perf["mfu"] is None and perf["peak_tflops"] is None  # a CPU has no peak to compare with
    assert perf["achieved_tflops"] == pytest.approx(perf["flops_per_batch"] * perf["batches_per_s"] / 1e12, rel=0.02)


def test_perf_mfu_against_a_given_peak_and_gpu_peaks() -> None:
    from types import SimpleNamespace

    from atelier.callbacks.perf import PerfSummary, peak_flops

    assert peak_flops(torch.device("cpu"), "bf16-mixed") is None
    perf = PerfSummary("unused", warmup_steps=0, peak_tflops=2.0)
    assert perf.warmup_steps == 1  # the last warm-up batch is the counted one
    perf._flops, perf._flops_images, perf._seen, perf._images = 4_000_000_000, 8, 11, 80
    perf._start, perf._end = 0.0, 5.0  # 10 timed batches in 5 s: 2 batches/s, 8 GFLOP/s
    trainer = SimpleNamespace(world_size=1, precision="bf16-mixed", is_global_zero=False)
    perf.on_train_end(trainer, SimpleNamespace(device=torch.device("cpu")))  # type: ignore[arg-type]
    assert perf.summary["batches_per_s"] == 2.0 and perf.summary["flops_per_image"] == 500_000_000
    assert perf.summary["achieved_tflops"] == 0.008 and perf.summary["mfu"] == 0.004

    # a step that raises inside the counted batch leaves no FLOP counter active
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    failing = PerfSummary("unused", warmup_steps=1)
    module = SimpleNamespace(device=torch.device("cpu"), hparams={})
    failing.on_train_batch_start(trainer, module, torch.zeros(2, 1), 0)  # type: ignore[arg-type]
    assert failing._counter is not None and len(_get_current_dispatch_mode_stack()) > 0
    failing.on_exception(trainer, module, RuntimeError("step failed"))  # type: ignore[arg-type]
    assert failing._counter is None and len(_get_current_dispatch_mode_stack()) == 0
