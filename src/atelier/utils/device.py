"""The ``device`` setting of the tasks (``sample``, ``evaluate``, ``stylize``, ``restore``, ``generate``)."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → ``cuda`` when a GPU is available, else ``cpu``; any other value (``cpu``, ``cuda:1``) as given."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)
