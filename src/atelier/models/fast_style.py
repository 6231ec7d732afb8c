"""Feed-forward style transfer (Johnson, Alahi & Fei-Fei 2016): one network per style, trained on content images
against the VGG-19 perceptual losses, then applied in a single pass."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atelier.models.image_to_image import ImageToImageModule, OptimizerFactory, SchedulerFactory, images_of, rows
from atelier.style.io import load_image
from atelier.style.losses import content_loss, gram_matrix, style_loss, total_variation
from atelier.style.vgg import LazyVGG


class FastStyle(ImageToImageModule):
    """Train an image transformation network ``f_W`` for one style image ``s`` (Johnson et al. 2016, Eq. 1-5):

        L(x) = λ_c ℓ_content(φ_j(f_W(x)), φ_j(x)) + λ_s Σ_l ℓ_style(G_l(f_W(x)), G_l(s)) + λ_TV ℓ_TV(f_W(x))

    with ``φ`` the frozen VGG-19 (loss network), content layer relu2_2 and style layers relu1_2, relu2_2, relu3_3,
    relu4_3 as in the paper; Gram matrices normalised by ``C·H·W`` (see :mod:`atelier.style.losses`).

    Logged: ``train/content``, ``train/style``, ``train/tv`` (weighted terms) and ``train/loss``; the same under
    ``val/``. The loss network is built and the style image read at ``setup("fit")``, so a wrong path or missing
    VGG weights fail before training; neither is needed to apply a trained checkpoint (:meth:`stylize`).

    Args:
        net: ``(B, 3, H, W)`` in ``[-1, 1]`` → ``(B, 3, H, W)`` (``atelier.style.transformer_net.TransformerNet``).
        optimizer: partial optimiser for ``net``.
        style_image: path of the style image (any format; converted to RGB).
        lr_scheduler: optional partial LR schedule, stepped every step.
        style_size: longer side of the style image in px when computing its Gram matrices (None: file size).
        content_layers: VGG-19 layers of the content term.
        style_layers: VGG-19 layers of the style term.
        content_weight: λ_c.
        style_weight: λ_s (with mean-squared Gram terms; λ_s/λ_c ≈ 1e5 as in the PyTorch examples).
        tv_weight: λ_TV (β = 1 TV on ``[-1, 1]`` pixels).
        vgg_weights: ``imagenet`` (real stylisation) or ``random`` (tests only).
        vgg_pool: ``max`` or ``avg``.
        vgg_seed: seed of random VGG weights.

    Raises:
        ValueError: for negative weights or an unknown ``vgg_weights``.
        FileNotFoundError / ValueError: at ``setup("fit")``, for a missing or unreadable ``style_image``.
        VGGWeightsError: at ``setup("fit")``, when the ImageNet VGG-19 weights are not available.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        style_image: str,
        lr_scheduler: SchedulerFactory | None = None,
        style_size: int | None = 256,
        content_layers: Sequence[str] = ("relu2_2",),
        style_layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3"),
        content_weight: float = 1.0,
        style_weight: float = 1.0e5,
        tv_weight: float = 0.0,
        vgg_weights: str = "imagenet",
        vgg_pool: str = "max",
        vgg_seed: int = 0,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        for key, value in (("content_weight", content_weight), ("style_weight", style_weight),
                           ("tv_weight", tv_weight)):
            if value < 0:
                raise ValueError(f"model.{key} must be >= 0, got {value}")
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"], logger=False)
        self.net = net
        self.content_layers = list(content_layers)
        self.style_layers = list(style_layers)
        self.vgg = LazyVGG([*self.content_layers, *self.style_layers], vgg_weights, vgg_pool, vgg_seed)
        self.style: torch.Tensor | None = None
        self._style_grams: dict[str, torch.Tensor] | None = None

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.style is None:
            path = Path(self.hparams.style_image).expanduser()
            try:
                self.style = load_image(path, self.hparams.style_size)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"model.style_image: {err}") from err
            self.vgg.get()

    def style_grams(self) -> dict[str, torch.Tensor]:
        """Gram matrices ``{layer: (1, C, C)}`` of the style image on the module's device (computed once)."""
        if self.style is None:
            self.setup("fit")
        if self._style_grams is None or next(iter(self._style_grams.values())).device != self.device:
            vgg = self.vgg.get(self.device)
            with torch.no_grad():
                feats = vgg(self.style.to(self.device))
            self._style_grams = {name: gram_matrix(feats[name]) for name in self.style_layers}
        return self._style_grams

    # ----------------------------------------------------------------- losses
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stylise ``(B, C, H, W)`` images in ``[-1, 1]`` (C = 1 is repeated to RGB): ``(B, 3, H, W)``,
        unbounded (see :meth:`stylize` for clamped output)."""
        return self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)

    def losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted loss terms ``content``, ``style``, ``tv`` and their sum ``loss`` (scalars) for a batch."""
        hp = self.hparams
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        y = self(x)
        vgg = self.vgg.get(self.device)
        with torch.no_grad():
            target = vgg(x)
        feats = vgg(y)
        lc = sum(content_loss(feats[name], target[name]) for name in self.content_layers)
        ls = style_loss({name: gram_matrix(feats[name]) for name in self.style_layers}, self.style_grams())
        terms = {"content": hp.content_weight * lc, "style": hp.style_weight * ls,
                 "tv": hp.tv_weight * total_variation(y) if hp.tv_weight else torch.zeros((), device=self.device)}
        terms["loss"] = terms["content"] + terms["style"] + terms["tv"]
        return terms

    def step(self, batch: Any, stage: str) -> torch.Tensor:
        x = images_of(batch)
        return self.log_terms(self.losses(x), stage, len(x))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    # ----------------------------------------------------------------- inference
    def stylize(self, x: torch.Tensor) -> torch.Tensor:
        """One forward pass in eval mode: ``(B, C, H, W)`` in ``[-1, 1]`` (any size) → ``(B, 3, H, W)`` in
        ``[-1, 1]``."""
        return self.in_eval_mode(lambda: self(x.to(self.device)).float().clamp(-1, 1))

    @torch.no_grad()
    def visualizations(self, generator: torch.Generator | None, images: torch.Tensor | None = None
                       ) -> dict[str, tuple[torch.Tensor, int]]:
        """``stylization``: rows alternate up to 8 inputs (validation images) and their stylised versions."""
        if images is None or len(images) == 0:
            return {}
        x = images[:16].to(self.device)
        per_row = min(8, len(x))
        return {"stylization": (rows(x, self.stylize(x), per_row=per_row), per_row)}
