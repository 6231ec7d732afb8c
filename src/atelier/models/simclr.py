"""Self-supervised features for evaluation: SimCLR (Chen et al. 2020) on the classifier network.

A yardstick trained without any label: ``python train.py experiment=art_simclr`` learns features of the art folder
by contrasting two augmented views of each painting, and ``feature_extractor=art_simclr`` scores models with them.
Unlike the art classifier (trained on the artist labels), these features owe nothing to the artists or to the
k-means clusters a conditional model may be trained on, so they are a second, independent yardstick.

The network is the classifier's: its penultimate activations ``h`` are the features, and its linear head maps
them to the projection ``z = W h`` on which the contrastive loss is computed (Chen et al. 2020, Sec. 2.1: the loss on
a projection, the representation before it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn

from atelier.models.classifier import augment_batch
from atelier.models.optim import optimizers_config


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Normalised temperature-scaled cross-entropy (NT-Xent, Chen et al. 2020, Eq. 1), averaged over all ``2B``
    anchors.

    Row ``i`` of ``z1`` and row ``i`` of ``z2`` are the positive pair; the other ``2B - 2`` projections of the batch
    are the negatives. Similarities are cosine similarities divided by ``temperature``.

    Args:
        z1, z2: ``(B, D)`` float projections of the two views, ``B ≥ 2``.
        temperature: ``τ > 0``.

    Returns:
        Scalar loss ≥ 0; ``log(2B - 1)`` for projections that carry no information (all equal).

    Raises:
        ValueError: for mismatched shapes, ``B < 2`` or ``τ ≤ 0``.
    """
    if z1.shape != z2.shape or z1.dim() != 2 or z1.shape[0] < 2:
        raise ValueError(f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} must be equal (B, D) with B ≥ 2")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))  # an anchor is not its own negative
    positives = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, positives)


def leave_one_out_knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Accuracy of a leave-one-out ``k``-nearest-neighbour vote (cosine similarity) among ``features`` ``(N, D)``
    with int64 ``labels`` ``(N,)``: how much of the labels the features carry, although training never saw them.

    Raises:
        ValueError: for ``N ≤ k`` or mismatched lengths.
    """
    n = features.shape[0]
    if labels.shape[0] != n or n <= k:
        raise ValueError(f"need more than k={k} features with one label each, got {n} and {labels.shape[0]}")
    f = F.normalize(features.float(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(float("-inf"))
    neighbours = labels[sim.topk(k, dim=1).indices]  # (N, k)
    votes = F.one_hot(neighbours, int(labels.max()) + 1).sum(1)
    return float((votes.argmax(1) == labels).float().mean())


class SimCLR(LightningModule):
    """Contrastive training of a :class:`~atelier.models.classifier.ClassifierNet` (SimCLR, Chen et al. 2020).

    Each training image ``(B, C, H, W)`` in ``[-1, 1]`` is augmented twice (``augment``, per image, see
    :func:`~atelier.models.classifier.augment_batch`); both views go through the network in one batch and
    :func:`nt_xent_loss` pulls each pair together. The labels of the batches are never used for training. Logs
    ``train/loss`` and, on the validation split, ``val/loss`` (the same loss on freshly augmented views) and
    ``val/knn_acc`` (:func:`leave_one_out_knn_accuracy` of the plain validation images' features against their
    folder labels: a diagnostic that the features carry content).

    Args:
        net: the network; ``net.features`` gives the representation, ``net.head`` the projection.
        optimizer: partial optimiser factory taking ``params``.
        augment: per-image augmentation of ``[0, 1]`` tensors (random resized crop, colour jitter ...).
        lr_scheduler: optional partial LR-scheduler factory taking ``optimizer`` and ``num_training_steps``.
        temperature: NT-Xent ``τ``.
        knn_k: neighbours of the validation diagnostic.
    """

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                 augment: Callable[[torch.Tensor], torch.Tensor], lr_scheduler: Callable[..., Any] | None = None,
                 temperature: float = 0.2, knn_k: int = 5) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"model.temperature={temperature} must be positive")
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler", "augment"], logger=False)
        self.net = net
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.augment = augment
        self._val_features: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NT-Xent inputs of a batch ``(B, C, H, W)``: the projections ``(B, D)`` of two augmented views."""
        with torch.no_grad():
            views = torch.cat([augment_batch(x, self.augment), augment_batch(x, self.augment)])
        z = self.net.head(self.net.features(views))
        return z.chunk(2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0]
        loss = nt_xent_loss(*self.projections(x), self.hparams.temperature)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = batch[0]
        if x.shape[0] >= 2:
            loss = nt_xent_loss(*self.projections(x), self.hparams.temperature)
            self.log("val/loss", loss, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        self._val_features.append(self.net.features(x).cpu())
        self._val_labels.append(batch[1].cpu())

    def on_validation_epoch_end(self) -> None:
        if self._val_features:
            features, labels = torch.cat(self._val_features), torch.cat(self._val_labels)
            if features.shape[0] > self.hparams.knn_k and not self.trainer.sanity_checking:
                acc = leave_one_out_knn_accuracy(features, labels, self.hparams.knn_k)
                self.log("val/knn_acc", acc, prog_bar=True, rank_zero_only=True)
        self._val_features, self._val_labels = [], []

    def configure_optimizers(self) -> Any:
        return optimizers_config(self.trainer, self.parameters(), self.optimizer_factory, self.lr_scheduler_factory)
