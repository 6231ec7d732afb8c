"""A small CNN classifier whose penultimate features serve as a domain extractor for FID/KID and precision/recall
and whose class predictions give IS and class histograms: ``feature_extractor=mnist_classifier`` (1 channel,
10 digits, 32 px) and ``feature_extractor=art_classifier`` (3 channels, 3 artists, 64 px) are the same module and
network, configured differently.

``python train.py experiment=mnist_classifier`` / ``experiment=art_classifier`` train them (see
``configs/experiment/``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn

from atelier.models.optim import optimizers_config


class ClassifierNet(nn.Module):
    """Three conv blocks (conv-BN-ReLU-maxpool) and two linear layers.

    Input ``(B, channels, image_size, image_size)`` float in ``[-1, 1]``; :meth:`features` gives the penultimate
    activations ``(B, feature_dim)`` (after ReLU), :meth:`forward` the class logits ``(B, num_classes)``.
    ``image_size`` must be divisible by 8 or be 28 (28 → 14 → 7 → 3).
    """

    def __init__(self, image_size: int = 32, channels: int = 1, num_classes: int = 10, width: int = 16,
                 feature_dim: int = 128, dropout: float = 0.2) -> None:
        super().__init__()
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        layers: list[nn.Module] = []
        c_in = channels
        for c_out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        side = image_size // 8
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` in ``[-1, 1]`` → penultimate features ``(B, feature_dim)`` float32 (≥ 0)."""
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` in ``[-1, 1]`` → class logits ``(B, num_classes)``."""
        return self.head(self.dropout(self.features(x)))


def augment_batch(x: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``transform`` to every image of a batch separately (its own random crop, flip and colour draw).

    Args:
        x: ``(B, C, H, W)`` float in ``[-1, 1]``.
        transform: one ``(C, H, W)`` float image in ``[0, 1]`` → ``(C, H', W')`` in ``[0, 1]`` (e.g. a
            ``torchvision.transforms.v2.Compose`` of ``RandomResizedCrop``, ``ColorJitter`` ...); it draws from
            torch's global RNG (seeded by ``seed_everything``).

    Returns:
        ``(B, C, H', W')`` float in ``[-1, 1]`` on the device of ``x``.
    """
    images = x.detach().add(1).div(2).clamp(0, 1)
    out = torch.stack([transform(image) for image in images])
    return out.clamp(0, 1).mul(2).sub(1).to(x.device, x.dtype)


class MNISTClassifier(LightningModule):
    """Cross-entropy training of :class:`ClassifierNet` on ``(image, label)`` batches (MNIST digits or artists).

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` and, from ``test_step`` (``trainer.test``)
    or at the end of training when ``test_on_train_end`` (the ``train`` task only calls ``fit``),
    ``test/loss`` and ``test/acc`` on the datamodule's test split (MNIST: the official 10k test set). The
    end-of-training test result lands in the run's ``metrics.json``.

    Args:
        net: the classifier network.
        optimizer: partial optimiser factory taking ``params``.
        lr_scheduler: optional partial LR-scheduler factory taking ``optimizer`` and ``num_training_steps``.
        test_on_train_end: evaluate the test split once training ends.
        augment: optional per-image training augmentation on tensors (see :func:`augment_batch`; ``None``: none),
            applied in ``training_step`` only, so validation, test and the feature extractor see plain images.
    """

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                 lr_scheduler: Callable[..., Any] | None = None, test_on_train_end: bool = True,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler", "augment"], logger=False)
        self.net = net
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.augment = augment

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=x.shape[0], sync_dist=sync)
        self.log(f"{stage}/acc", acc, prog_bar=True, batch_size=x.shape[0], sync_dist=sync)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.augment is not None:
            with torch.no_grad():
                batch = (augment_batch(batch[0], self.augment), *batch[1:])
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    @torch.no_grad()
    def accuracy(self, loader: Any) -> tuple[float, float]:
        """``(mean cross-entropy, accuracy)`` of the network in eval mode over ``loader``."""
        was_training = self.net.training
        self.net.eval()
        total, correct, loss = 0, 0, 0.0
        try:
            for x, y, *_ in loader:
                x, y = x.to(self.device), y.to(self.device)
                logits = self.net(x)
                loss += F.cross_entropy(logits, y, reduction="sum").item()
                correct += int((logits.argmax(1) == y).sum())
                total += len(y)
        finally:
            self.net.train(was_training)
        return loss / max(total, 1), correct / max(total, 1)

    def on_train_end(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not self.hparams.test_on_train_end or datamodule is None or self.trainer.sanity_checking:
            return
        if getattr(datamodule, "test_set", None) is None or not self.trainer.is_global_zero:
            return
        loss, acc = self.accuracy(datamodule.test_dataloader())
        metrics = {"test/loss": loss, "test/acc": acc}
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)
        # the train task writes trainer.callback_metrics into metrics.json
        self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        print(f"test accuracy {acc:.4f} (loss {loss:.4f}) on {len(datamodule.test_set)} test images")

    def configure_optimizers(self) -> Any:
        return optimizers_config(self.trainer, self.parameters(), self.optimizer_factory, self.lr_scheduler_factory)
