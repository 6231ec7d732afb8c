"""Atelier's Optuna sweeper as a Hydra plugin (``hydra/sweeper=atelier_optuna``); see docs/sweeps.md.

``hydra_plugins`` is a namespace package: Hydra imports every module under it at start-up and registers the
concrete plugin classes it finds there.
"""
