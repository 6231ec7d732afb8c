"""Image restoration: a network trained to map synthetically degraded images back to clean ones, evaluated with
PSNR and SSIM per degradation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from atelier.models.image_to_image import ImageToImageModule, OptimizerFactory, SchedulerFactory, images_of, rows
from atelier.nets.padding import pad_to_multiple
from atelier.restore.degradations import Degradation, check_names

LOSSES = ("l1", "mse")


class Restoration(ImageToImageModule):
    """Blind restoration network ``r(y) ≈ x`` for clean images ``x`` and degraded ``y = d(x)``.

    Each training image gets one degradation drawn uniformly from ``degradations``; the loss is the L1 or MSE
    between ``r(y)`` and ``x`` in ``[-1, 1]`` units. With ``residual`` the network predicts the correction,
    ``r(y) = y + net(y)`` (as DnCNN, Zhang et al. 2017), and a UNet's output convolution starts at zero so that
    training starts from the identity. A diffusers ``UNet2DModel`` is called with timestep 0
    (a plain image-to-image UNet); any other ``net`` is called as ``net(y)``.

    Validation applies every degradation to every validation image (with a CPU generator seeded per batch and
    degradation, so the degraded set is the same at every evaluation) and logs, per degradation ``<name>``:
    ``val/psnr/<name>`` and ``val/ssim/<name>`` of the restored images, ``val/psnr_input/<name>`` of the degraded
    input (the baseline to beat), ``val/loss/<name>``; and their means ``val/psnr``, ``val/ssim``, ``val/loss``.
    PSNR (dB; mean of per-image values) and SSIM (Wang et al. 2004, 11×11 Gaussian window) are torchmetrics' on
    intensities in ``[0, 1]`` with ``data_range=1.0`` set explicitly; outputs are clamped to the valid range.

    Args:
        net: ``(B, C, H, W)`` → ``(B, C, H, W)``.
        optimizer: partial optimiser for ``net``.
        degradations: the named degradations (:mod:`atelier.restore.degradations`), configured as a list.
        lr_scheduler: optional partial LR schedule, stepped every step.
        loss: ``l1`` or ``mse``.
        residual: predict ``x − y`` instead of ``x``.
        size_multiple: inputs are padded to a multiple of this (default: the UNet's total downsampling factor).
        vis_images: images per row of the ``restoration`` grid.

    Raises:
        ValueError: for an unknown ``loss``, an empty degradation list or repeated names.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        degradations: Sequence[Degradation],
        lr_scheduler: SchedulerFactory | None = None,
        loss: str = "l1",
        residual: bool = True,
        size_multiple: int | None = None,
        vis_images: int = 8,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        if loss not in LOSSES:
            raise ValueError(f"model.loss={loss!r} is not allowed; choose one of {list(LOSSES)}")
        self.names = check_names(degradations)
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler", "degradations"], logger=False)
        self.net = net
        if residual and isinstance(net, UNet2DModel):
            # start from the identity r(y) = y: the degraded input is the baseline the network improves on
            nn.init.zeros_(net.conv_out.weight)
            nn.init.zeros_(net.conv_out.bias)
        self.degradations = list(degradations)
        if size_multiple is None:
            size_multiple = 2 ** (len(net.config.block_out_channels) - 1) if isinstance(net, UNet2DModel) else 1
        self.size_multiple = int(size_multiple)
        self.psnr = nn.ModuleDict({n: PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)) for n in self.names})
        self.psnr_input = nn.ModuleDict({n: PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)) for n in self.names})
        self.ssim = nn.ModuleDict({n: StructuralSimilarityIndexMeasure(data_range=1.0) for n in self.names})
        self.val_loss = nn.ModuleDict({n: MeanMetric() for n in self.names})

    # ----------------------------------------------------------------- network
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Restore degraded images ``(B, C, H, W)`` in ``[-1, 1]`` (any size): ``(B, C, H, W)``, unbounded."""
        padded, (h, w) = pad_to_multiple(y, self.size_multiple)
        if isinstance(self.net, UNet2DModel):
            out = self.net(padded, torch.zeros(len(y), dtype=torch.long, device=y.device)).sample
        else:
            out = self.net(padded)
        out = out[..., :h, :w]
        return y + out if self.hparams.residual else out

    def restore(self, y: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Eval-mode restoration in batches: ``(B, C, H, W)`` in ``[-1, 1]`` → same shape, clamped to
        ``[-1, 1]``, float32."""
        y = y.to(self.device)
        return self.in_eval_mode(lambda: torch.cat([self(y[i:i + batch_size]).float().clamp(-1, 1)
                                                    for i in range(0, len(y), batch_size)]))

    def degradation(self, name: str) -> Degradation:
        """The configured degradation called ``name``.

        Raises:
            KeyError: for an unknown name, listing the configured ones.
        """
        for d in self.degradations:
            if d.name == name:
                return d
        raise KeyError(f"no degradation named {name!r}; this model has {self.names}")

    def degrade_mixed(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Each image of ``(B, C, H, W)`` degraded by one degradation drawn uniformly."""
        choice = torch.randint(len(self.degradations), (len(x),), generator=generator)
        y = torch.empty_like(x)
        for k, d in enumerate(self.degradations):
            idx = (choice == k).nonzero().flatten().to(x.device)
            if len(idx):
                y[idx] = d(x[idx], generator).to(y.dtype)
        return y

    def _loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fn = F.l1_loss if self.hparams.loss == "l1" else F.mse_loss
        return fn(pred.float(), target.float())

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = images_of(batch)
        loss = self._loss(self(self.degrade_mixed(x)), x)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = images_of(batch)
        clean = (x.float() + 1) / 2
        for k, d in enumerate(self.degradations):
            generator = torch.Generator().manual_seed(1000 * batch_idx + k)
            y = d(x, generator)
            pred = self(y)
            self.val_loss[d.name].update(self._loss(pred, x).detach(), weight=len(x))
            self.psnr[d.name].update((pred.float().clamp(-1, 1) + 1) / 2, clean)
            self.ssim[d.name].update((pred.float().clamp(-1, 1) + 1) / 2, clean)
            self.psnr_input[d.name].update((y.float().clamp(-1, 1) + 1) / 2, clean)

    def on_validation_epoch_end(self) -> None:
        if not self.val_loss[self.names[0]].update_called:
            return
        values: dict[str, torch.Tensor] = {}
        metrics = {"loss": self.val_loss, "psnr": self.psnr, "ssim": self.ssim, "psnr_input": self.psnr_input}
        for key, per_name in metrics.items():
            for name in self.names:
                values[f"val/{key}/{name}"] = per_name[name].compute().float()  # synced across ranks
                per_name[name].reset()
            if key != "psnr_input":
                values[f"val/{key}"] = torch.stack([values[f"val/{key}/{n}"] for n in self.names]).mean()
        psnr = values.pop("val/psnr")
        self.log_dict(values)
        self.log("val/psnr", psnr, prog_bar=True)

    # ----------------------------------------------------------------- grids
    @torch.no_grad()
    def visualizations(self, generator: torch.Generator | None, images: torch.Tensor | None = None
                       ) -> dict[str, tuple[torch.Tensor, int]]:
        """``restoration``: for every degradation, a row of degraded, a row of restored and a row of clean
        validation images (up to ``vis_images`` per row), degradations top to bottom in config order."""
        if images is None or len(images) == 0:
            return {}
        x = images[: self.hparams.vis_images].to(self.device)
        blocks = []
        for d in self.degradations:
            y = d(x, generator)
            blocks.append(rows(y, self.restore(y), x, per_row=len(x)))
        return {"restoration": (torch.cat(blocks), len(x))}
