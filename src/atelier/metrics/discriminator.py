"""Does a trained GAN's discriminator still tell real from fake? Logits and AUROC on un-augmented images.

The training log's ``train/d_real`` / ``train/d_fake`` are means over DiffAugment-ed batches while D is moving;
this measures the finished D once, in eval mode, on three sets: training reals (seen by D), held-out reals (never
seen: D's generalisation) and samples of the EMA generator (what the GAN is judged by). A D that separates has
``auroc_train`` and ``auroc_heldout`` well above 0.5; ``auroc_train`` ≫ ``auroc_heldout`` means D memorised the
training paintings (Karras et al. 2020, "Training GANs with limited data", Fig. 1).

A D that does not separate at the end is either too weak (capacity, or a constraint such as spectral norm that
keeps its logits small) or alive but matched by G, which moves away from whatever D learnt last (the GAN game's
equilibrium, where D(real) = D(fake)). :func:`refit_discriminator` tells the two apart: it trains a copy of the
finished D for a few hundred steps against the *frozen* EMA generator. A D that then separates had the capacity.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.classification import binary_auroc

from atelier.losses.gan import discriminator_loss


def dataset_batch(dataset: Dataset, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``min(n, len(dataset))`` items of an ``(image, label)`` or image dataset, stacked:
    ``((n, C, H, W) float32, (n,) int64 or None)``."""
    items = [dataset[i] for i in range(min(int(n), len(dataset)))]  # type: ignore[arg-type]
    if isinstance(items[0], Sequence) and not isinstance(items[0], torch.Tensor):
        images = torch.stack([it[0] for it in items])
        labels = torch.as_tensor([int(it[1]) for it in items]) if len(items[0]) > 1 else None
        return images, labels
    return torch.stack(list(items)), None


@torch.no_grad()
def logits(discriminator: nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
           batch_size: int = 128) -> torch.Tensor:
    """``(N,)`` float32 D logits of ``(N, C, H, W)`` images in ``[-1, 1]`` (``labels`` ``(N,)`` for a projection D)."""
    out = []
    for s in range(0, len(images), batch_size):
        y = None if labels is None else labels[s:s + batch_size]
        out.append(discriminator(images[s:s + batch_size], y).float().flatten())
    return torch.cat(out)


def discriminator_separation(gan: Any, train_set: Dataset, heldout_set: Dataset | None, num_samples: int = 500,
                             seed: int = 0, discriminator: nn.Module | None = None) -> dict[str, float | int | None]:
    """Mean logits and real-vs-fake AUROC of ``gan.discriminator`` (eval mode, no DiffAugment).

    Args:
        gan: an :class:`atelier.models.gan.GAN` (``discriminator``, ``sample(n, generator, labels)``,
            ``num_classes``).
        train_set, heldout_set: datasets of ``(image (C, H, W) in [-1, 1], label)``; ``heldout_set`` may be ``None``.
        num_samples: images per set (the first ones of each dataset; as many EMA-generator samples, with the
            real set's labels when conditional).
        seed: seed of the generator's latents.
        discriminator: the D to measure (default ``gan.discriminator``), e.g. one from :func:`refit_discriminator`.

    Returns:
        ``d_real_train``, ``d_real_heldout``, ``d_fake`` (mean logits), ``auroc_train``, ``auroc_heldout``
        (probability that a real image gets a higher logit than a fake one), ``acc_train`` (share of reals with a
        logit above the median of all logits of reals and fakes) and the counts.

    Raises:
        ValueError: for ``num_samples < 2``.
    """
    if int(num_samples) < 2:
        raise ValueError(f"num_samples={num_samples} must be at least 2")
    d = gan.discriminator if discriminator is None else discriminator
    was_training = d.training
    d.eval()
    try:
        real, labels = dataset_batch(train_set, num_samples)
        conditional = getattr(gan, "num_classes", None) is not None
        labels = labels if conditional else None
        fake = gan.sample(len(real), generator=torch.Generator().manual_seed(seed), labels=labels).cpu()
        device = next(d.parameters()).device
        real_logits = logits(d, real.to(device), None if labels is None else labels.to(device)).cpu()
        fake_logits = logits(d, fake.to(device), None if labels is None else labels.to(device)).cpu()
        result: dict[str, float | int | None] = {
            "d_real_train": real_logits.mean().item(), "d_fake": fake_logits.mean().item(),
            "auroc_train": _auroc(real_logits, fake_logits), "num_train": len(real), "num_fake": len(fake),
            "d_real_heldout": None, "auroc_heldout": None, "num_heldout": 0,
        }
        threshold = torch.cat([real_logits, fake_logits]).median()
        result["acc_train"] = 0.5 * ((real_logits > threshold).float().mean() +
                                     (fake_logits <= threshold).float().mean()).item()
        if heldout_set is not None and len(heldout_set) > 0:  # type: ignore[arg-type]
            held, held_labels = dataset_batch(heldout_set, num_samples)
            held_labels = held_labels if conditional else None
            held_logits = logits(d, held.to(device), None if held_labels is None else held_labels.to(device)).cpu()
            result.update(d_real_heldout=held_logits.mean().item(), num_heldout=len(held),
                          auroc_heldout=_auroc(held_logits, fake_logits))
        return result
    finally:
        d.train(was_training)


def _auroc(real: torch.Tensor, fake: torch.Tensor) -> float:
    scores = torch.cat([real, fake])
    target = torch.cat([torch.ones(len(real), dtype=torch.long), torch.zeros(len(fake), dtype=torch.long)])
    return float(binary_auroc(scores, target))


def refit_discriminator(gan: Any, train_set: Dataset, steps: int = 200, batch_size: int = 64, lr: float = 4e-4,
                        seed: int = 0) -> tuple[nn.Module, list[float]]:
    """Train a copy of ``gan.discriminator`` against the frozen EMA generator: does D have the capacity to separate?

    The copy is trained with the GAN's own D loss (``gan.hparams.loss``; R1 and gradient penalties are left out)
    on DiffAugment-ed reals and fakes (``gan.augment``, as in training), Adam(``lr``, β = (0, 0.99)), fresh EMA
    samples with the real batch's labels at every step. ``gan`` itself is not changed.

    Args:
        gan: an :class:`atelier.models.gan.GAN`.
        train_set: dataset of ``(image (C, H, W) in [-1, 1], label)`` (the GAN's training split).
        steps: D optimiser steps (≥ 1).
        batch_size: reals (and as many fakes) per step.
        lr: Adam learning rate.
        seed: seed of the data order and of the latents.

    Returns:
        ``(the trained copy of D, in eval mode; its loss at every step)``.

    Raises:
        ValueError: for ``steps < 1``, ``batch_size < 1`` or a ``train_set`` smaller than ``batch_size``.
    """
    if int(steps) < 1 or int(batch_size) < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be at least 1")
    d = copy.deepcopy(gan.discriminator).train()
    device = next(d.parameters()).device
    opt = torch.optim.Adam(d.parameters(), lr=lr, betas=(0.0, 0.99))
    conditional = getattr(gan, "num_classes", None) is not None
    order = torch.Generator().manual_seed(seed)
    latents = torch.Generator().manual_seed(seed + 1)
    loader = DataLoader(train_set, batch_size=int(batch_size), shuffle=True, drop_last=True, generator=order)
    if len(loader) == 0:
        raise ValueError(f"train_set has {len(train_set)} items, fewer than batch_size={batch_size}")  # type: ignore[arg-type]
    losses: list[float] = []
    batches = iter(loader)
    while len(losses) < int(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        real, labels = (batch[0], batch[1]) if isinstance(batch, list | tuple) else (batch, None)
        labels = labels if conditional else None
        with torch.no_grad():
            fake = gan.sample(len(real), generator=latents, labels=labels).to(device)
        real = real.to(device)
        y = None if labels is None else labels.to(device)
        loss = discriminator_loss(gan.hparams.loss, d(gan.augment(real), y), d(gan.augment(fake), y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return d.eval(), losses
