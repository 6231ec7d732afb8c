"""Arbitrary style transfer with adaptive instance normalisation (Huang & Belongie 2017): a frozen VGG-19 encoder
up to relu4_1, an AdaIN layer and a trained decoder; any style image at test time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from atelier.data.content_style import StyleImages
from atelier.models.image_to_image import ImageToImageModule, OptimizerFactory, SchedulerFactory, images_of, rows
from atelier.nets.padding import pad_to_multiple
from atelier.style.adain import adain, blend_adain
from atelier.style.color import luminance, match_luminance, preserve_color
from atelier.style.losses import adain_style_loss
from atelier.style.vgg import LazyVGG

ENCODER_LAYER = "relu4_1"


class AdaINStyle(ImageToImageModule):
    """AdaIN style transfer network ``T(c, s) = g(AdaIN(f(c), f(s)))`` (Huang & Belongie 2017, Eqs. 9-12).

    Training minimises ``L = λ_c ‖f(g(t)) − t‖² + λ_s Σ_l (‖μ(φ_l(g(t))) − μ(φ_l(s))‖² + ‖σ(φ_l(g(t))) −
    σ(φ_l(s))‖²)`` with ``t = AdaIN(f(c), f(s))``, ``f`` = VGG-19 up to relu4_1 and ``φ_l`` its relu1_1 … relu4_1
    (mean-squared terms). Content images come from the datamodule (first element of each batch); one style crop
    per content image is drawn from :class:`~atelier.data.content_style.StyleImages` over ``style_dir``.

    Logged: ``train/content``, ``train/style`` (weighted) and ``train/loss``; the same under ``val/`` with fixed
    central style crops. The encoder (frozen, rebuilt from ``vgg_weights``) is not stored in checkpoints; only
    the decoder is trained and saved.

    Args:
        decoder: ``(B, 512, H/8, W/8)`` → ``(B, 3, H, W)`` (``atelier.style.adain.AdaINDecoder``).
        optimizer: partial optimiser for the decoder.
        style_dir: folder of style images (read at ``setup("fit")``).
        lr_scheduler: optional partial LR schedule, stepped every step.
        image_size: side of the style crops in px (normally ``data.image_size``).
        style_scale: style images are resized to a shorter side of ``style_scale · image_size`` before cropping.
        style_layers: layers of the style term (must end at or before relu4_1).
        content_weight: λ_c.
        style_weight: λ_s (10 in the paper).
        vgg_weights: ``imagenet`` (real stylisation) or ``random`` (tests only).
        vgg_seed: seed of random VGG weights.

    Raises:
        ValueError: for a style layer deeper than relu4_1 or negative weights.
    """

    def __init__(
        self,
        decoder: nn.Module,
        optimizer: OptimizerFactory,
        style_dir: str,
        lr_scheduler: SchedulerFactory | None = None,
        image_size: int = 256,
        style_scale: float = 2.0,
        style_layers: Sequence[str] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1"),
        content_weight: float = 1.0,
        style_weight: float = 10.0,
        vgg_weights: str = "imagenet",
        vgg_seed: int = 0,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        allowed = ("relu1_1", "relu1_2", "relu2_1", "relu2_2", "relu3_1", "relu3_2", "relu3_3", "relu3_4", "relu4_1")
        bad = [name for name in style_layers if name not in allowed]
        if bad:
            raise ValueError(f"model.style_layers {bad} are not available: the encoder ends at relu4_1; "
                             f"choose from {list(allowed)}")
        if content_weight < 0 or style_weight < 0:
            raise ValueError(f"model.content_weight and model.style_weight must be >= 0, got "
                             f"{content_weight}, {style_weight}")
        self.save_hyperparameters(ignore=["decoder", "optimizer", "lr_scheduler"], logger=False)
        self.decoder = decoder
        self.style_layers = list(style_layers)
        self.encoder = LazyVGG([*self.style_layers, ENCODER_LAYER], vgg_weights, "max", vgg_seed)
        self.styles: StyleImages | None = None

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and self.styles is None:
            hp = self.hparams
            self.styles = StyleImages(hp.style_dir, hp.image_size, hp.style_scale)
            self.encoder.get()

    # ----------------------------------------------------------------- network
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """VGG-19 features ``{layer: (B, C_l, H_l, W_l)}`` of images in ``[-1, 1]`` (1 channel is repeated)."""
        return self.encoder.get(self.device)(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)

    def losses(self, content: torch.Tensor, style: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted ``content``, ``style`` and ``loss`` (scalars) for ``(B, C, H, W)`` content and
        ``(B, 3, S, S)`` style images in ``[-1, 1]``; ``H, W`` should be multiples of 8."""
        hp = self.hparams
        with torch.no_grad():
            f_c = self.encode(content)[ENCODER_LAYER]
            f_s = self.encode(style)
            t = adain(f_c, f_s[ENCODER_LAYER])
        g = self.decoder(t)
        f_g = self.encode(g)
        terms = {"content": hp.content_weight * F.mse_loss(f_g[ENCODER_LAYER], t),
                 "style": hp.style_weight * adain_style_loss(f_g, f_s, self.style_layers)}
        terms["loss"] = terms["content"] + terms["style"]
        return terms

    def step(self, batch: Any, stage: str) -> torch.Tensor:
        content, _ = pad_to_multiple(images_of(batch), 8)
        if self.styles is None:
            self.setup("fit")
        n = len(content)
        style = self.styles.sample(n) if stage == "train" else self.styles.fixed(n)
        return self.log_terms(self.losses(content, style.to(self.device, content.dtype)), stage, n)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters())

    # ----------------------------------------------------------------- inference
    def stylize(self, content: torch.Tensor, styles: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
                alpha: float = 1.0, preserve_colors: bool = False, color_space: str = "yiq") -> torch.Tensor:
        """Stylise content images with one style or a weighted mix of several (Huang & Belongie 2017, Sec. 7.1).

        Args:
            content: ``(B, C, H, W)`` in ``[-1, 1]``, any size (padded to a multiple of 8 inside).
            styles: style images, each ``(1 or B, 3, H_k, W_k)`` in ``[-1, 1]``, any size.
            weights: blend weights of the styles (normalised; default equal).
            alpha: style strength in ``[0, 1]``.
            preserve_colors: luminance-only transfer keeping the content's colours (Gatys et al. 2016b).
            color_space: ``yiq`` or ``ycbcr``.

        Returns:
            ``(B, 3, H, W)`` float32 in ``[-1, 1]``.
        """
        original = content.to(self.device).float()
        original = original.expand(-1, 3, -1, -1) if original.shape[1] == 1 else original
        content, styles = original, [s.to(self.device).float() for s in styles]
        if preserve_colors:
            styles = [match_luminance(s, original, color_space) for s in styles]
            content = luminance(original, color_space)
        padded, (h, w) = pad_to_multiple(content, 8)

        def run() -> torch.Tensor:
            f_c = self.encode(padded)[ENCODER_LAYER]
            f_s = [self.encode(s)[ENCODER_LAYER] for s in styles]
            return self.decoder(blend_adain(f_c, f_s, weights, alpha))[..., :h, :w].float().clamp(-1, 1)

        out = self.in_eval_mode(run)
        return preserve_color(out, original, color_space) if preserve_colors else out

    def _fixed_styles(self, n: int) -> torch.Tensor:
        if self.styles is None:
            self.setup("fit")
        return self.styles.fixed(n).to(self.device)

    @torch.no_grad()
    def visualizations(self, generator: torch.Generator | None, images: torch.Tensor | None = None
                       ) -> dict[str, tuple[torch.Tensor, int]]:
        """``stylization``: for up to 8 validation images, rows of contents, styles (fixed central crops) and
        outputs."""
        if images is None or len(images) == 0:
            return {}
        x = images[:8].to(self.device)
        styles = self._fixed_styles(len(x))
        out = torch.cat([self.stylize(x[i:i + 1], [styles[i:i + 1]]) for i in range(len(x))])
        return {"stylization": (rows(x, styles, out, per_row=len(x)), len(x))}
