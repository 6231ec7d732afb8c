"""scripts/merge_seeds.py on tables that the real fid_vs_nfe.py and autoguidance_sweep.py wrote for a tiny DDPM:
means and spreads over seeds, the autoguided label and NFE, the reference column, and the refusals."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from atelier.tasks import train
from tests.conftest import ROOT
from tests.test_evaluate import TINY_RUN, classifier_ckpt  # noqa: F401  (a fixture)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=600, env=ENV)


def test_merge_seeds_averages_per_row_and_refuses_mixed_tables(
        train_cfg: Callable[..., DictConfig], tmp_path: Path, classifier_ckpt: Path) -> None:  # noqa: F811
    train.run(train_cfg(*TINY_RUN, "callbacks.sample_grid=null"))
    ckpt = str(tmp_path / "checkpoints" / "last.ckpt")
    common = ["--num-samples", "20", "--batch-size", "10", "--reference-size", "40", "--metrics", "fid,kid",
              "--classifier-ckpt", str(classifier_ckpt), "--cache-dir", str(tmp_path / "cache")]
    tables = []
    for seed in (0, 1):
        out = tmp_path / f"front{seed}"
        done = _script("fid_vs_nfe.py", ckpt, "--rows", "ddim-2,ddpm-4", "--seed", str(seed), *common, "--out",
                       str(out))
        assert done.returncode == 0, done.stderr[-2000:]
        tables.append(out / "fid_vs_nfe.json")
    # the sweep's w = 1 row is ddim-2 at seed 0 again (must agree); its guided row is another label at 2 x NFE
    done = _script("autoguidance_sweep.py", ckpt, "--guides", ckpt, "--scales", "1,2", "--sampler", "ddim",
                   "--steps", "2", "--seed", "0", *common, "--out", str(tmp_path / "ag"))
    assert done.returncode == 0, done.stderr[-2000:]
    tables.append(tmp_path / "ag" / "autoguidance_sweep.json")

    out = tmp_path / "merged"
    done = _script("merge_seeds.py", *map(str, tables), "--reference", "ddpm-4", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {(r["sampler"], int(r["NFE"])): r for r in csv.DictReader((out / "merged.csv").read_text().splitlines())}
    assert set(rows) == {("ddim", 2), ("ddpm", 4), ("ddim + AG(last, w=2)", 4)}
    per_seed = [{r["sampler"]: r for r in json.loads(t.read_text())["rows"]} for t in tables[:2]]
    for name, nfe in (("ddim", 2), ("ddpm", 4)):
        fids = [per_seed[s][name]["fid"] for s in (0, 1)]
        row = rows[(name, nfe)]
        assert row["seeds"] == "0 1"
        assert float(row["fid"]) == pytest.approx(statistics.fmean(fids))
        assert float(row["fid_std"]) == pytest.approx(statistics.stdev(fids))
        assert float(row["kid"]) == pytest.approx(statistics.fmean(per_seed[s][name]["kid"] for s in (0, 1)))
    ref = float(rows[("ddpm", 4)]["fid"])
    assert float(rows[("ddpm", 4)]["vs_ref_%"]) == pytest.approx(0.0)
    assert float(rows[("ddim", 2)]["vs_ref_%"]) == pytest.approx(100 * (float(rows[("ddim", 2)]["fid"]) / ref - 1))
    guided = rows[("ddim + AG(last, w=2)", 4)]
    assert guided["seeds"] == "0" and guided["fid_std"] == ""  # one seed: no spread
    assert (out / "merged.png").stat().st_size > 1000
    assert json.loads((out / "merged.json").read_text())["protocol"]["num_samples"] == 20

    # another protocol (sample count) is refused, naming the key
    done = _script("fid_vs_nfe.py", ckpt, "--rows", "ddim-2", *common[:1], "10", *common[2:], "--out",
                   str(tmp_path / "other"))
    assert done.returncode == 0, done.stderr[-2000:]
    done = _script("merge_seeds.py", str(tables[0]), str(tmp_path / "other" / "fid_vs_nfe.json"), "--out",
                   str(tmp_path / "bad"))
    assert done.returncode != 0 and "num_samples" in done.stderr
    # two different FIDs for one seed and row are refused
    forged = json.loads(tables[1].read_text())
    forged["protocol"]["seed"] = 0
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    done = _script("merge_seeds.py", str(tables[0]), str(tmp_path / "forged.json"), "--out", str(tmp_path / "bad"))
    assert done.returncode != 0 and "the same seed must give the same images" in done.stderr
    # a reference that is not a row names the rows there are
    done = _script("merge_seeds.py", str(tables[0]), "--reference", "ddpm-1000", "--out", str(tmp_path / "bad"))
    assert done.returncode != 0 and "('ddim', 2)" in done.stderr
