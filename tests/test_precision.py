"""CPU precision by hardware: bf16-mixed with AMX, or AVX512-BF16 on AMD (Zen 4: both measured faster in bf16);
32-true otherwise (Intel AVX512-BF16 without AMX emulated slower, AVX2 measured 14x slower)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from atelier.utils import precision
from atelier.utils.hydra_jobs import register_resolvers
from atelier.utils.precision import (
    FLAGS_ENV,
    autocast_dtype_for_cpu,
    cpu_bf16_pays,
    cpu_flags,
    cpu_precision,
)
from tests.conftest import compose_cfg

register_resolvers()

SAPPHIRE_RAPIDS = {"GenuineIntel", "avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
ZEN4 = {"AuthenticAMD", "avx2", "avx512f", "avx512_bf16"}
COOPER_LAKE = {"GenuineIntel", "avx2", "avx512f", "avx512_bf16"}
AVX2_ONLY = {"AuthenticAMD", "sse4_2", "avx", "avx2", "fma"}


@pytest.mark.parametrize(("flags", "expected"), [(SAPPHIRE_RAPIDS, "bf16-mixed"), (ZEN4, "bf16-mixed"),
                                                 (COOPER_LAKE, "32-true"), (AVX2_ONLY, "32-true"),
                                                 (set(), "32-true")])
def test_rule_on_fake_flag_sets(flags: set[str], expected: str) -> None:
    assert cpu_precision(flags) == expected
    assert cpu_bf16_pays(flags) == (expected == "bf16-mixed")
    assert autocast_dtype_for_cpu(flags) == (torch.bfloat16 if expected == "bf16-mixed" else None)


def test_flags_from_cpuinfo_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 amx_bf16\n\n"
                    "processor\t: 1\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 amx_bf16\n")
    monkeypatch.delenv(FLAGS_ENV, raising=False)
    assert cpu_flags(info) == {"GenuineIntel", "fpu", "avx2", "amx_bf16"}
    zen4 = tmp_path / "zen4"
    zen4.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert cpu_precision(cpu_flags(zen4)) == "bf16-mixed"
    assert cpu_flags(tmp_path / "missing") == frozenset()  # macOS, Windows: no /proc/cpuinfo -> fp32
    monkeypatch.setenv(FLAGS_ENV, "avx2, fma")
    assert cpu_flags(info) == {"avx2", "fma"}
    assert cpu_precision() == "32-true"


def test_choice_is_logged_once_with_its_reason(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
                                               ) -> None:
    monkeypatch.setattr(precision, "_logged", set())
    with caplog.at_level(logging.INFO, logger="atelier.utils.precision"):
        for _ in range(3):
            cpu_precision(AVX2_ONLY)
        cpu_precision(SAPPHIRE_RAPIDS)
        cpu_precision(COOPER_LAKE)
        cpu_precision(ZEN4)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert "precision=32-true" in lines[0] and "no bf16 units" in lines[0]
    assert "precision=bf16-mixed" in lines[1] and "(amx_bf16)" in lines[1]
    assert "precision=32-true" in lines[2] and "avx512_bf16 but no amx_bf16 and is not AMD" in lines[2]
    assert "precision=bf16-mixed" in lines[3] and "AMD with avx512_bf16" in lines[3]
    assert all("trainer.precision" in line for line in lines)


@pytest.mark.parametrize(("flags", "expected"), [("avx2,amx_bf16,avx512_bf16", "bf16-mixed"),
                                                 ("AuthenticAMD,avx2,avx512_bf16", "bf16-mixed"),
                                                 ("GenuineIntel,avx2,avx512_bf16", "32-true"), ("avx2", "32-true")])
def test_trainer_cpu_resolves_precision_from_the_rule(flags: str, expected: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FLAGS_ENV, flags)
    cfg = compose_cfg("train", ["trainer=cpu"], tmp_path)
    assert cfg.trainer.precision == expected
    assert OmegaConf.to_container(cfg.trainer, resolve=True)["precision"] == expected


@pytest.mark.parametrize("flags", ["avx2,amx_bf16", "avx2"])
def test_explicit_precision_override_wins(flags: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FLAGS_ENV, flags)
    assert compose_cfg("train", ["trainer=cpu", "trainer.precision=32-true"], tmp_path).trainer.precision == "32-true"
    cfg = compose_cfg("train", ["trainer=cpu", "trainer.precision=bf16-mixed"], tmp_path)
    assert cfg.trainer.precision == "bf16-mixed"


def test_cpu_experiments_follow_the_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FLAGS_ENV, "avx2")
    assert compose_cfg("train", ["experiment=ddpm_mnist_cpu"], tmp_path).trainer.precision == "32-true"
