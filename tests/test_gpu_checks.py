"""The prepared GPU checks (scripts/gpu_checks.sh) at toy size on the CPU: their command lines must keep working,
since a broken override found on a lent GPU machine costs device-minutes that a session cannot get back."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_mfu_and_nfe_checks_run_at_toy_size(tmp_path: Path, mnist_available: Path) -> None:
    env = {**os.environ, "DEVICE_SMOKE": "1", "OUT": str(tmp_path), "ATELIER_DATA_DIR": str(mnist_available),
           "PYTHON": os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python")), "OMP_NUM_THREADS": "2"}
    for check in ("mfu", "nfe"):
        done = subprocess.run(["bash", "scripts/gpu_checks.sh", check], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    perf = json.loads((tmp_path / "perf.json").read_text())
    # the CIFAR-size UNet's training FLOPs at 32 px: ~12.8 GFLOP per image (forward + backward), counted, not assumed
    assert perf["batches"] > 0 and perf["images_per_s"] > 0 and perf["flops_per_image"] > 1e9
    assert perf["flops_per_batch"] == pytest.approx(perf["flops_per_image"] * 16, rel=1e-6)  # smoke batch 16
    assert perf["mfu"] is None  # a CPU has no peak in the table
    with open(tmp_path / "fid_vs_nfe" / "fid_vs_nfe.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["sampler"], int(r["NFE"])) for r in rows] == [("ddpm", 20), ("dpmpp_sde", 5)]
    assert all(float(r["fid"]) > 0 for r in rows)
