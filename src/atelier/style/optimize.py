"""Optimisation-based style transfer (Gatys, Ecker & Bethge 2016, "Image Style Transfer Using Convolutional
Neural Networks", CVPR).

The pixels ``x`` of the output are optimised directly to minimise (Eq. 7, plus a total-variation prior)

    L(x) = α · Σ_{l ∈ content} ℓ_content(F_l(x), F_l(c)) + β · Σ_{l ∈ style} w_l ℓ_style(G_l(x), A_l) + γ · ℓ_TV(x)

with ``F_l`` the VGG-19 activations, ``G_l`` their Gram matrices and ``A_l`` the (blended) Gram matrices of the
style image(s) (see :mod:`atelier.style.losses`). L-BFGS is the paper's optimiser; Adam is offered too.
Luminance-only colour preservation (Gatys et al. 2016b) runs the whole optimisation on luminance images and
recombines the result with the content's chroma (:mod:`atelier.style.color`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from atelier.style.color import luminance, match_luminance, preserve_color
from atelier.style.losses import blend_grams, content_loss, gram_matrix, style_loss, total_variation
from atelier.style.vgg import CONTENT_LAYERS, STYLE_LAYERS, VGGFeatures

log = logging.getLogger(__name__)

OPTIMIZERS = ("lbfgs", "adam")
INITS = ("content", "style", "noise")


@dataclass
class GatysResult:
    """Output of :func:`stylize_gatys`.

    Attributes:
        image: ``(1, 3, H, W)`` float32 in ``[-1, 1]`` (content size).
        history: per loss evaluation ``{"content", "style", "tv", "total"}`` (weighted terms, floats).
        evaluations: loss evaluations done (L-BFGS may evaluate more than once per iteration).
    """

    image: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: int = 0


def _init_image(init: str, content: torch.Tensor, style: torch.Tensor, generator: torch.Generator | None
                ) -> torch.Tensor:
    if init == "content":
        return content.clone(memory_format=torch.contiguous_format)
    if init == "style":
        return torch.nn.functional.interpolate(style, size=content.shape[-2:], mode="bilinear", align_corners=False,
                                               antialias=True)
    noise = torch.randn(content.shape, generator=generator).to(content.device)
    return (0.5 * noise).clamp(-1, 1)  # white noise around mid-grey, as the paper's random init


def stylize_gatys(
    content: torch.Tensor,
    styles: Sequence[torch.Tensor],
    vgg: VGGFeatures,
    style_weights: Sequence[float] | None = None,
    content_layers: Sequence[str] = CONTENT_LAYERS,
    style_layers: Sequence[str] = STYLE_LAYERS,
    style_layer_weights: Mapping[str, float] | None = None,
    content_weight: float = 1.0,
    style_weight: float = 1.0e6,
    tv_weight: float = 0.0,
    optimizer: str = "lbfgs",
    steps: int = 300,
    lr: float | None = None,
    init: str = "content",
    preserve_colors: bool = False,
    color_space: str = "yiq",
    generator: torch.Generator | None = None,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> GatysResult:
    """Gatys et al. 2016 style transfer of one content image.

    Args:
        content: ``(1, 3, H, W)`` float in ``[-1, 1]``; fixes the output size.
        styles: one or more ``(1, 3, H_k, W_k)`` style images in ``[-1, 1]`` (any size).
        vgg: feature extractor that returns every layer of ``content_layers`` and ``style_layers``.
        style_weights: blend weights of the styles (normalised; default equal).
        content_layers: layers of the content term (default ``relu4_2``).
        style_layers: layers of the style term (default ``relu1_1 … relu5_1``).
        style_layer_weights: ``w_l`` per style layer (default 1).
        content_weight: α.
        style_weight: β; with Gram matrices normalised by ``C·H·W`` and mean-squared terms, α/β ≈ 1e-6 … 1e-4
            gives strongly stylised results with ImageNet weights.
        tv_weight: γ (``ℓ_TV`` with β = 1 on ``[-1, 1]`` pixels).
        optimizer: ``lbfgs`` (the paper's choice; ``steps`` = maximum loss evaluations) or ``adam``.
        steps: L-BFGS iterations / Adam steps.
        lr: step size (default 1.0 for L-BFGS, 0.02 for Adam, in ``[-1, 1]`` pixel units).
        init: start from the ``content`` image, the first ``style`` image (resized) or white ``noise``.
        preserve_colors: luminance-only transfer that keeps the content's colours.
        color_space: ``yiq`` or ``ycbcr`` for ``preserve_colors``.
        generator: CPU generator for the noise init.
        progress: show a progress bar with the loss terms.
        callback: called as ``callback(evaluation, losses)`` after every loss evaluation.

    Raises:
        ValueError: for an unknown ``optimizer`` or ``init``, ``steps < 1``, missing VGG layers or bad weights.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not allowed; choose one of {list(OPTIMIZERS)}")
    if init not in INITS:
        raise ValueError(f"init={init!r} is not allowed; choose one of {list(INITS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not styles:
        raise ValueError("at least one style image is needed")
    missing = [name for name in dict.fromkeys([*content_layers, *style_layers]) if name not in vgg.layers]
    if missing:
        raise ValueError(f"the VGG feature extractor does not return {missing}; build it with these layers")
    weights = list(style_weights) if style_weights is not None else [1.0] * len(styles)
    device = next(vgg.parameters()).device
    content = content.to(device).float()
    styles = [s.to(device).float() for s in styles]
    if preserve_colors:
        original_content = content
        styles = [match_luminance(s, content, color_space) for s in styles]
        content = luminance(content, color_space)

    with torch.no_grad():
        content_targets = {name: f for name, f in vgg(content).items() if name in content_layers}
        grams = [{name: gram_matrix(f) for name, f in vgg(s).items() if name in style_layers} for s in styles]
        style_targets = blend_grams(grams, weights)

    x = _init_image(init, content, styles[0], generator).detach().contiguous().requires_grad_(True)
    if optimizer == "lbfgs":
        opt: torch.optim.Optimizer = torch.optim.LBFGS([x], lr=lr or 1.0, max_iter=steps, max_eval=steps,
                                                       tolerance_grad=-1, tolerance_change=-1, history_size=100)
    else:
        opt = torch.optim.Adam([x], lr=lr or 0.02)

    result = GatysResult(image=x)
    bar = tqdm(total=steps, desc=f"gatys/{optimizer}", disable=not progress, dynamic_ncols=True)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        features = vgg(x)
        lc = sum(content_loss(features[name], content_targets[name]) for name in content_layers)
        ls = style_loss({name: gram_matrix(features[name]) for name in style_layers}, style_targets,
                        style_layer_weights)
        terms = {"content": content_weight * lc, "style": style_weight * ls,
                 "tv": tv_weight * total_variation(x) if tv_weight else torch.zeros((), device=device)}
        total = terms["content"] + terms["style"] + terms["tv"]
        total.backward()
        losses = {k: float(v.detach()) for k, v in terms.items()} | {"total": float(total.detach())}
        result.history.append(losses)
        result.evaluations += 1
        if callback is not None:
            callback(result.evaluations, losses)
        bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()}, refresh=False)
        bar.update(1)
        return total

    try:
        if optimizer == "lbfgs":
            opt.step(closure)
        else:
            for _ in range(steps):
                opt.step(closure)
                with torch.no_grad():
                    x.clamp_(-1.5, 1.5)  # keep Adam from drifting far outside the image range
    finally:
        bar.close()

    image = x.detach().clamp(-1, 1)
    if preserve_colors:
        image = preserve_color(image, original_content, color_space)
    result.image = image
    return result
