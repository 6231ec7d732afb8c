"""Hyperparameter sweeps: Atelier's Optuna sweeper for Hydra (plugin ``hydra/sweeper=atelier_optuna``).

:mod:`atelier.sweeps.config` (schema), :mod:`atelier.sweeps.search_space` (override grammar → Optuna
distributions), :mod:`atelier.sweeps.optuna_sweeper` (ask, launch, tell). See docs/sweeps.md.
"""
