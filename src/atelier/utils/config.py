"""Config helpers: instantiate a group of objects, print the config tree, record how a run was made."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

PACKAGES = ("torch", "torchvision", "lightning", "hydra-core", "diffusers", "torchmetrics", "wandb", "atelier")


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a config group (callbacks, loggers) into a list."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def print_config_tree(cfg: DictConfig, order: Sequence[str] = ("data", "model", "callbacks", "logger",
                                                                "trainer", "paths"), save_to: Path | None = None
                      ) -> None:
    """Print the resolved config as a Rich tree (groups in ``order`` first) and optionally save it as text."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key), style="bold")
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        with open(save_to, "w") as f:
            rich.print(tree, file=f)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_info(seed: int | None) -> dict[str, Any]:
    """What reproduces a run: git commit and dirtiness, package versions, Python, command line, seed."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "seed": seed,
    }


def write_json(data: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path
