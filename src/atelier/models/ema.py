"""Exponential moving average of weights on top of ``torch.optim.swa_utils.AveragedModel``."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay_at(step: int | torch.Tensor, max_decay: float, warmup: bool) -> float:
    """EMA decay after ``step`` updates: ``min(max_decay, (1 + step) / (10 + step))`` with warm-up.

    The warm-up form is the one of TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` used by
    Ho et al. (2020); without warm-up the decay is ``max_decay`` from the first update.
    """
    step = int(step)
    if not warmup:
        return max_decay
    return min(max_decay, (1.0 + step) / (10.0 + step))


def make_ema(net: nn.Module, max_decay: float = 0.999, warmup: bool = True) -> AveragedModel:
    """Return an ``AveragedModel`` holding an EMA copy of ``net`` (parameters and buffers, frozen).

    ``ema.update_parameters(net)`` moves every floating-point tensor by ``(1 - decay) * (param - ema)`` and copies
    integer buffers (BatchNorm's ``num_batches_tracked``); ``ema.module`` is the averaged network. Its state
    (weights and ``n_averaged``) is part of the owner's ``state_dict``.

    Raises:
        ValueError: if ``max_decay`` is outside ``[0, 1)``.
    """
    if not 0.0 <= max_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {max_decay}")

    @torch.no_grad()
    def multi_avg_fn(ema_params: list[torch.Tensor], params: list[torch.Tensor], n: torch.Tensor) -> None:
        if not ema_params[0].is_floating_point():  # e.g. BatchNorm's num_batches_tracked: copy, not average
            torch._foreach_copy_(ema_params, params)
            return
        decay = ema_decay_at(n, max_decay, warmup)
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)

    ema = AveragedModel(net, multi_avg_fn=multi_avg_fn, use_buffers=True)
    ema.requires_grad_(False)
    return ema
