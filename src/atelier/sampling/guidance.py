"""Classifier-free guidance (Ho & Salimans 2022) and the class labels it conditions on.

A class-conditional network is trained with its label replaced by a *null class* with probability
``cond_drop_prob``, so one network gives both the conditional prediction ``ε_c = ε(x_t, t, y)`` and the
unconditional one ``ε_u = ε(x_t, t, ∅)``. Sampling combines them (Ho & Salimans 2022, Eq. 6, written with the
guidance scale ``w`` of diffusers / Imagen rather than the paper's ``1 + w``)::

    ε̂ = ε_u + w · (ε_c − ε_u)

``w = 0`` is the unconditional model, ``w = 1`` the plain conditional one, ``w > 1`` trades diversity for
fidelity to the class. The combination is linear, so it applies unchanged to ε-, v- and x0-predictions.

*Autoguidance* (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", Eq. 2) applies the
same extrapolation with a weaker *guide* network in place of the unconditional prediction, so it works for
unconditional models too::

    D̂ = D_guide + w · (D_main − D_guide)

where the guide is the same model trained for less long (here: an earlier checkpoint's EMA network).

Both guidances can be limited to an interval of noise levels ``σ ∈ (σ_lo, σ_hi]`` (Kynkäänniemi et al. 2024,
"Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion Models",
arXiv:2404.07724): guidance at high noise pushes samples towards few modes, at low noise it does little, so
outside the interval the plain network samples alone (:func:`in_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def apply_guidance(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``uncond + w · (cond − uncond)``: the guided prediction, same shape and dtype as the inputs.

    Args:
        uncond: ``(B, C, H, W)`` prediction for the null class.
        cond: ``(B, C, H, W)`` prediction for the requested classes.
        guidance_scale: ``w`` (0: unconditional, 1: conditional).
    """
    if guidance_scale == 1.0:
        return cond
    if guidance_scale == 0.0:
        return uncond
    return uncond + guidance_scale * (cond - uncond)


def guided_prediction(
    net: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    null_label: int,
    guidance_scale: float,
) -> torch.Tensor:
    """The network's classifier-free-guided prediction at ``(x, t)``.

    For ``w ∉ {0, 1}`` the conditional and unconditional passes run as one batch of ``2B`` (one network call,
    NFE counted once per step as in diffusers); ``w = 1`` needs only the conditional pass and ``w = 0`` only the
    unconditional one.

    Args:
        net: called as ``net(x, t, labels)`` → ``(B, C, H, W)``.
        x: ``(B, C, H, W)`` noisy images.
        t: ``(B,)`` int64 timesteps.
        labels: ``(B,)`` int64 class indices in ``[0, null_label)``.
        null_label: the index of the null class (the number of real classes).
        guidance_scale: ``w``.
    """
    if guidance_scale == 1.0:
        return net(x, t, labels)
    null = torch.full_like(labels, null_label)
    if guidance_scale == 0.0:
        return net(x, t, null)
    both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, labels]))
    uncond, cond = both.chunk(2)
    return apply_guidance(uncond, cond, guidance_scale)


def autoguided_prediction(
    predict: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    main: nn.Module,
    guide: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    autoguidance_scale: float,
) -> torch.Tensor:
    """Autoguided prediction ``D_guide + w · (D_main − D_guide)`` at ``(x, t)`` (Karras et al. 2024, Eq. 2).

    Two network calls per step (the main network and the guide), each on ``B`` images; ``w = 1`` skips the guide.

    Args:
        predict: ``predict(net, x, t)`` → ``(B, C, H, W)``, the prediction of ``net`` in the model's
            parameterization (ε, v or x0; the combination is linear, so any of them works), with any
            classifier-free guidance already applied.
        main: the network being sampled.
        guide: the weaker network of the same architecture and parameterization (e.g. an earlier checkpoint's EMA).
        x: ``(B, C, H, W)`` noisy images.
        t: ``(B,)`` timesteps.
        autoguidance_scale: ``w`` (1: the main network alone; > 1 extrapolates away from the guide).
    """
    pred = predict(main, x, t)
    if autoguidance_scale == 1.0:
        return pred
    return apply_guidance(predict(guide, x, t), pred, autoguidance_scale)


def in_interval(sigma: float, interval: tuple[float, float]) -> bool:
    """Whether the noise level ``sigma`` lies in the guidance interval ``(σ_lo, σ_hi]`` (Kynkäänniemi et al. 2024,
    Sec. 4: guidance is applied where ``σ_lo < σ ≤ σ_hi``)."""
    return interval[0] < sigma <= interval[1]


def drop_labels(labels: torch.Tensor, null_label: int, drop_prob: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by ``null_label`` with probability ``drop_prob`` (classifier-free guidance training).

    Args:
        labels: ``(B,)`` int64 class indices.
        null_label: the null-class index.
        drop_prob: probability in ``[0, 1]``.
        generator: optional CPU generator for reproducible drops.

    Returns:
        ``(B,)`` int64 on ``labels.device``.
    """
    if drop_prob <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator).to(labels.device) < drop_prob
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def rows_per_class(n: int, num_classes: int) -> torch.Tensor:
    """``(n,)`` int64 labels ``0,0,…,1,1,…``: ``ceil(n / num_classes)`` consecutive images per class, so a grid
    with that many images per row shows one class per row."""
    per_class = math.ceil(n / num_classes)
    return torch.arange(num_classes).repeat_interleave(per_class)[:n]


def conditioning_labels(n: int, labels: torch.Tensor | None, num_classes: int,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n,)`` int64 labels on ``device`` to sample a class-conditional model with: ``labels`` as given (any
    int sequence or tensor of ``n`` entries), or :func:`rows_per_class` when ``None``.

    Raises:
        ValueError: when ``labels`` has other than ``n`` entries or a class outside ``[0, num_classes)``.
    """
    if labels is None:
        labels = rows_per_class(n, num_classes)
    labels = torch.as_tensor(labels, dtype=torch.long).flatten().to(device)
    if labels.numel() != n:
        raise ValueError(f"got {labels.numel()} labels for {n} samples")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"class labels must lie in [0, {num_classes}); got {labels.unique().tolist()}")
    return labels


def prior_labels(n: int, class_counts: torch.Tensor) -> torch.Tensor:
    """``(n,)`` int64 labels whose class frequencies follow ``class_counts`` ``(K,)`` (e.g. the training split's
    label counts), by largest-remainder quotas (Hamilton's method), each class's images consecutive. Sampling a
    class-conditional model with these labels draws from ``p(x) = Σ_y p(y) p(x | y)``, the unconditional data
    distribution, instead of a balanced mixture of the classes.

    Raises:
        ValueError: for counts that are negative, not 1-D, or sum to zero.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or bool((counts < 0).any()) or float(counts.sum()) <= 0:
        raise ValueError(f"class_counts must be a 1-D tensor of non-negative counts with a positive sum; got {counts}")
    exact = counts / counts.sum() * n
    quota = exact.floor().long()
    left = n - int(quota.sum())
    if left > 0:
        quota[torch.argsort(exact - quota, descending=True, stable=True)[:left]] += 1
    return torch.arange(counts.numel()).repeat_interleave(quota)
