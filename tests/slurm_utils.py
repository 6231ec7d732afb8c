"""Helpers for the tests on a real SLURM cluster: start/stop it, find a sweep's jobs, read ``scontrol``, submitit
result files and W&B transaction logs."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "slurm_local_cluster.sh"
SLURM_DIR = Path(os.environ.get("ATELIER_SLURM_DIR", "/tmp/atelier-slurm"))


def _running(env: dict[str, str]) -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(re.search(r"^(idle|mix|alloc)", out.stdout, re.M))


def start_local_cluster() -> tuple[dict[str, str] | None, bool, str]:
    """Start (or reuse) the one-node cluster. Returns (environment with ``SLURM_CONF``, whether this call started
    it, why not when the environment is ``None``)."""
    env = {"SLURM_CONF": str(SLURM_DIR / "slurm.conf")}
    if (SLURM_DIR / "slurm.conf").exists() and _running({**os.environ, **env}):
        return env, False, ""
    if os.geteuid() != 0:
        return None, False, "not root (slurmd and apt-get need root)"
    if shutil.which("apt-get") is None and shutil.which("sbatch") is None:
        return None, False, "neither sbatch nor apt-get on PATH"
    proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return None, False, f"{SCRIPT.name} start exited {proc.returncode}: {proc.stderr[-2000:]}"
    match = re.search(r"export SLURM_CONF=(\S+)", proc.stdout)
    if not match:
        return None, False, f"{SCRIPT.name} printed no SLURM_CONF: {proc.stdout[-500:]}"
    return {"SLURM_CONF": match.group(1)}, True, ""


def stop_local_cluster() -> None:
    subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


def job_ids(sweep_dir: Path) -> list[str]:
    """SLURM job ids of a submitit sweep (``<sweep>/.submitit/<id>/``; array tasks as ``<array>_<task>``)."""
    root = sweep_dir / ".submitit"
    if not root.exists():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and re.fullmatch(r"\d+(_\d+)?", p.name)]
    tasks = sorted((n for n in names if "_" in n), key=lambda n: tuple(map(int, n.split("_"))))
    return tasks or sorted(names)  # an array's own folder holds only its submission file


def scontrol_job(job: str, env: dict[str, str]) -> dict[str, str]:
    """``scontrol show job <job>`` as a dict (``JobState``, ``Restarts``, ``Reason``, ...); empty when unknown."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                         timeout=30)
    fields: dict[str, str] = {}
    for token in out.stdout.split():
        key, _, value = token.partition("=")
        fields.setdefault(key, value)
    return fields


def submitit_result(sweep_dir: Path, job: str) -> tuple[str, Any]:
    """``(outcome, value)`` from submitit's ``<job>_0_result.pkl`` (``("success", JobReturn)``), the file the
    submitting process reads."""
    path = sweep_dir / ".submitit" / job / f"{job}_0_result.pkl"
    with open(path, "rb") as f:
        return pickle.load(f)


def job_logs(sweep_dir: Path, job: str) -> str:
    """stdout + stderr of a submitit job (all attempts: SLURM appends on requeue)."""
    folder = sweep_dir / ".submitit" / job
    return "".join(p.read_text(errors="replace") for p in sorted(folder.glob(f"{job}_0_log.*")))


def wait_until(condition: Any, timeout: float, what: str, proc: subprocess.Popen | None = None,
               log_file: Path | None = None, poll: float = 0.5) -> None:
    """Poll ``condition()`` until true; fail after ``timeout`` s or when ``proc`` exited first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-5000:] if log_file and log_file.exists() else ""
            raise AssertionError(f"submitter exited ({proc.returncode}) before: {what}\n{tail}")
        if time.monotonic() > deadline:
            tail = log_file.read_text(errors="replace")[-5000:] if log_file and log_file.exists() else ""
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}\n{tail}")
        time.sleep(poll)


# ---------------------------------------------------------------- W&B transaction log (.wandb)
_BLOCK = 32 * 1024


def wandb_record_types(wandb_file: Path) -> list[str]:
    """The record types in a W&B transaction log (``run-<id>.wandb``): LevelDB log format after a 7-byte W&B
    header, 32 KiB blocks of chunks (checksum 4 B, length 2 B LE, type 1 B: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = wandb_file.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{wandb_file} is not a W&B transaction log")
    pos, pending, kinds = 7, b"", []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            kinds.append(record.WhichOneof("record_type") or "")
            pending = b""
    return kinds


def finished_job(job: str, env: dict[str, str], timeout: float = 90) -> dict[str, str]:
    """``scontrol show job`` once the job has left RUNNING/COMPLETING (submitit writes its result file before
    the job's processes have exited)."""
    info: dict[str, str] = {}

    def done() -> bool:
        nonlocal info
        info = scontrol_job(job, env)
        return info.get("JobState") not in (None, "RUNNING", "COMPLETING", "PENDING", "REQUEUED")

    wait_until(done, timeout, f"job {job} to end")
    return info
