"""Atelier: experiment-tracked training of generative art models.

Entry points (``train.py``, ``sample.py``) compose a Hydra config and call :mod:`atelier.tasks`.
Every generative module offers ``sample(n, generator=None) -> (n, C, H, W)`` in ``[-1, 1]``.
"""

__version__ = "0.1.0"
