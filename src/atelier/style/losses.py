"""Style-transfer losses: Gram matrices, content, style and total-variation terms, AdaIN statistics.

Notation: ``F`` is a VGG activation of shape ``(B, C, H, W)``, seen as ``C`` feature maps of ``M = H·W`` values.

* Gram matrix (Gatys et al. 2016, Eq. 3; normalised as in Johnson et al. 2016, Eq. 3):
  ``G_ij = Σ_k F_ik F_jk / (C·H·W)``.
* Content loss (Gatys et al. 2016, Eq. 1 up to the constant; Johnson et al. 2016 "feature reconstruction loss",
  Eq. 2): ``ℓ_content = ‖F(x) − F(c)‖² / (C·H·W)``, the mean squared difference.
* Style loss (Gatys et al. 2016, Eqs. 4-5; Johnson et al. 2016 "style reconstruction loss", Eq. 4, with the
  Frobenius norm replaced by the mean over the ``C²`` entries so that weights do not depend on ``C``):
  ``ℓ_style = Σ_l w_l · mean_ij (G_l(x) − A_l)²``.
* Total variation (Mahendran & Vedaldi 2015; the smoothness term of Johnson et al. 2016):
  ``ℓ_TV = mean |x_{i+1,j} − x_{i,j}|^β + mean |x_{i,j+1} − x_{i,j}|^β``.
* AdaIN style loss (Huang & Belongie 2017, Eq. 12): ``Σ_l ‖μ(φ_l(x)) − μ(φ_l(s))‖² + ‖σ(φ_l(x)) − σ(φ_l(s))‖²``
  (mean over channels).

All losses return a scalar float tensor averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix of ``(B, C, H, W)`` features, normalised by ``C·H·W``: ``(B, C, C)`` float32.

    Computed in float32 even under mixed precision (the sums over ``H·W`` overflow bf16/fp16 precision).
    """
    b, c, h, w = features.shape
    f = features.float().reshape(b, c, h * w)
    return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


def content_loss(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of ``(B, C, H, W)`` features and their target (broadcast over the batch)."""
    return F.mse_loss(features.float(), target.float().expand_as(features))


def style_loss(grams: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
               layer_weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """``Σ_l w_l · mean (G_l − A_l)²`` over the layers of ``targets``.

    Args:
        grams: ``{layer: (B, C, C)}`` Gram matrices of the image being optimised / generated.
        targets: ``{layer: (1 or B, C, C)}`` target Gram matrices of the style image (or their blend).
        layer_weights: ``w_l`` per layer (default 1 for each; Gatys et al. used equal weights).
    """
    total = torch.zeros((), device=next(iter(grams.values())).device)
    for layer, target in targets.items():
        weight = 1.0 if layer_weights is None else float(layer_weights.get(layer, 1.0))
        total = total + weight * F.mse_loss(grams[layer], target.expand_as(grams[layer]))
    return total


def total_variation(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """``mean |Δ_h x|^β + mean |Δ_w x|^β`` for images ``(B, C, H, W)`` (anisotropic TV; β = 1 is the L1 form,
    β = 2 the squared form).

    Example: ``x = [[0, 1], [3, 5]]`` (one channel) has vertical differences ``3, 4`` and horizontal ``1, 2``:
    ``ℓ_TV = 3.5 + 1.5 = 5`` for β = 1 and ``12.5 + 2.5 = 15`` for β = 2.
    """
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().pow(beta).mean()
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().pow(beta).mean()
    return dh + dw


def mean_std(features: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation over the spatial dimensions: each ``(B, C, 1, 1)``.

    ``σ = sqrt(var + eps)`` with the biased variance (as in Huang & Belongie 2017's implementation).
    """
    mean = features.mean(dim=(2, 3), keepdim=True)
    var = features.var(dim=(2, 3), keepdim=True, unbiased=False)
    return mean, (var + eps).sqrt()


def adain_style_loss(features: Mapping[str, torch.Tensor], style_features: Mapping[str, torch.Tensor],
                     layers: Sequence[str]) -> torch.Tensor:
    """Huang & Belongie 2017, Eq. 12: match per-channel mean and std of ``(B, C, H, W)`` features layer by
    layer (mean squared difference over ``B·C``, summed over ``layers``)."""
    total = torch.zeros((), device=next(iter(features.values())).device)
    for layer in layers:
        mu, sigma = mean_std(features[layer].float())
        mu_s, sigma_s = mean_std(style_features[layer].float())
        total = total + F.mse_loss(mu, mu_s) + F.mse_loss(sigma, sigma_s)
    return total


def blend_grams(grams: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted average of the Gram targets of several style images (weights normalised to sum to 1): the
    multi-style blend of Gatys et al. 2016 (Sec. "style mixing"), ``{layer: (1, C, C)}``.

    Raises:
        ValueError: for a weight count that differs from the number of styles, a negative weight or a zero sum.
    """
    if len(grams) != len(weights):
        raise ValueError(f"style_weights has {len(weights)} entries for {len(grams)} style images")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"style_weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return {layer: sum(float(w) / total * g[layer] for w, g in zip(weights, grams, strict=True))
            for layer in grams[0]}
