"""Colour preservation for style transfer (Gatys, Bethge, Hertzmann & Shechtman 2016, "Preserving Color in
Neural Artistic Style Transfer", arXiv:1606.05897, Sec. 2.2 "luminance-only transfer").

Images are split into a luminance channel ``Y`` and two chroma channels (``I, Q`` of YIQ, or ``Cb, Cr`` of
YCbCr, both defined on RGB in ``[0, 1]``). Style is transferred on luminance only; the output keeps the content
image's chroma: ``out = RGB(Y_stylised, chroma_content)``. The style luminance is first matched to the content
luminance's mean and std (the paper's Eq. 1), so the overall brightness stays that of the content.

Public functions take and return ``(B, 3, H, W)`` float images in ``[-1, 1]`` (the Atelier convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# rows: Y, I, Q (NTSC 1953 coefficients, as in the paper)
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])
# rows: Y, Cb, Cr (ITU-R BT.601, full range, chroma centred on 0)
_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
SPACES = {"yiq": _YIQ, "ycbcr": _YCBCR}


def _matrix(space: str, like: torch.Tensor) -> torch.Tensor:
    if space not in SPACES:
        raise ValueError(f"color space {space!r} is not allowed; choose one of {list(SPACES)}")
    return SPACES[space].to(device=like.device, dtype=torch.float32)


def rgb_to_luma_chroma(x: torch.Tensor, space: str = "yiq") -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in ``[-1, 1]`` → ``(B, 3, H, W)`` float32 ``(Y, chroma1, chroma2)`` with ``Y`` in
    ``[0, 1]`` and chroma centred on 0."""
    rgb = (x.float() + 1) / 2
    return torch.einsum("ij,bjhw->bihw", _matrix(space, x), rgb)


def luma_chroma_to_rgb(y: torch.Tensor, space: str = "yiq") -> torch.Tensor:
    """Inverse of :func:`rgb_to_luma_chroma`: ``(B, 3, H, W)`` → RGB in ``[-1, 1]`` (not clamped)."""
    inverse = torch.linalg.inv(_matrix(space, y))
    return torch.einsum("ij,bjhw->bihw", inverse, y.float()) * 2 - 1


def luminance(x: torch.Tensor, space: str = "yiq") -> torch.Tensor:
    """Luminance of RGB ``(B, 3, H, W)`` in ``[-1, 1]`` as a 3-channel grey image ``(B, 3, H, W)`` in
    ``[-1, 1]`` (the form VGG takes for luminance-only transfer)."""
    y = rgb_to_luma_chroma(x, space)[:, :1]
    return (y * 2 - 1).expand(-1, 3, -1, -1)


def match_luminance(style: torch.Tensor, content: torch.Tensor, space: str = "yiq") -> torch.Tensor:
    """Grey image of the style's luminance, shifted and scaled to the content luminance's mean and std
    (Gatys et al. 2016b, Eq. 1: ``L_s' = σ_c/σ_s (L_s − μ_s) + μ_c``): ``(B, 3, H_s, W_s)`` in ``[-1, 1]``."""
    ls = rgb_to_luma_chroma(style, space)[:, :1]
    lc = rgb_to_luma_chroma(content, space)[:, :1]
    ls = (ls - ls.mean()) / ls.std().clamp_min(1e-6) * lc.std() + lc.mean()
    return (ls.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1)


def preserve_color(stylized: torch.Tensor, content: torch.Tensor, space: str = "yiq") -> torch.Tensor:
    """Keep the luminance of ``stylized`` and the chroma of ``content`` (resized to the stylised size with
    bilinear interpolation): ``(B, 3, H, W)`` in ``[-1, 1]``, clamped.

    Args:
        stylized: ``(B, 3, H, W)`` (or a 3-channel grey image from luminance-only transfer) in ``[-1, 1]``.
        content: ``(B or 1, 3, H_c, W_c)`` in ``[-1, 1]``.
        space: ``yiq`` (the paper's choice) or ``ycbcr``.
    """
    if content.shape[-2:] != stylized.shape[-2:]:
        content = F.interpolate(content.float(), size=stylized.shape[-2:], mode="bilinear", align_corners=False,
                                antialias=True)
    luma = rgb_to_luma_chroma(stylized, space)[:, :1]
    chroma = rgb_to_luma_chroma(content, space)[:, 1:].expand(luma.shape[0], -1, -1, -1)
    return luma_chroma_to_rgb(torch.cat([luma, chroma], dim=1), space).clamp(-1, 1)
