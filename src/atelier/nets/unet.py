"""UNet2DModel built from the field's terms (channels, layers per block, attention resolutions)."""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import UNet2DModel


def build_unet(
    image_size: int,
    in_channels: int = 1,
    out_channels: int | None = None,
    block_out_channels: Sequence[int] = (64, 128, 256),
    layers_per_block: int = 2,
    attention_resolutions: Sequence[int] = (8,),
    attention_head_dim: int = 32,
    dropout: float = 0.0,
    norm_num_groups: int = 32,
    num_classes: int | None = None,
) -> UNet2DModel:
    """Build a diffusers ``UNet2DModel`` for ``(B, in_channels, image_size, image_size)`` inputs.

    The resolution halves after every block but the last, so block ``i`` runs at ``image_size / 2**i`` px.
    A block whose resolution is in ``attention_resolutions`` gets self-attention (as in Ho et al. 2020 and
    Dhariwal & Nichol 2021, "attention_resolutions" in px, not downsampling factors).

    Args:
        image_size: input height = width in px; must be divisible by ``2 ** (len(block_out_channels) - 1)``.
        in_channels: image channels (1 for MNIST, 3 for RGB).
        out_channels: predicted channels; defaults to ``in_channels``.
        block_out_channels: channels per resolution level.
        layers_per_block: ResNet layers per level.
        attention_resolutions: resolutions (px) at which to add self-attention.
        attention_head_dim: channels per attention head.
        dropout: dropout in the ResNet blocks.
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
        num_classes: classes of a class-conditional model (``None``: unconditional). The class embedding gets
            ``num_classes + 1`` rows; the last, index ``num_classes``, is the null class of classifier-free
            guidance (Ho & Salimans 2022).

    Returns:
        A ``UNet2DModel`` whose forward takes ``(x, t)`` (plus ``class_labels`` ``(B,)`` int64 when conditional)
        with ``x`` of shape ``(B, C, H, W)`` and ``t`` of shape
        ``(B,)`` (int64 timesteps) and returns ``.sample`` of shape ``(B, out_channels, H, W)``.

    Raises:
        ValueError: when the image size does not divide, a channel count is not a multiple of
            ``norm_num_groups``, or an attention resolution is not one of the UNet's, naming the offending
            argument.
    """
    if num_classes is not None and int(num_classes) < 1:
        raise ValueError(f"num_classes={num_classes} must be a positive number of classes or null")
    levels = len(block_out_channels)
    if levels < 1:
        raise ValueError("block_out_channels must name at least one level")
    factor = 2 ** (levels - 1)
    if image_size % factor:
        raise ValueError(
            f"image_size={image_size} is not divisible by 2**(len(block_out_channels)-1)={factor}; "
            f"change data.image_size or model.net.block_out_channels"
        )
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"block_out_channels {list(block_out_channels)} must be multiples of "
                         f"norm_num_groups={norm_num_groups} (offending: {bad})")
    resolutions = [image_size // 2**i for i in range(levels)]
    unknown = sorted(set(attention_resolutions) - set(resolutions))
    if unknown:
        raise ValueError(f"model.net.attention_resolutions: {unknown} are not among this UNet's resolutions "
                         f"{resolutions} (image_size={image_size}, {levels} levels); choose a subset of "
                         f"{resolutions}, or [] for no self-attention")
    attn = [r in set(attention_resolutions) for r in resolutions]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=attention_head_dim,
        dropout=dropout,
        norm_num_groups=norm_num_groups,
        num_class_embeds=None if num_classes is None else int(num_classes) + 1,
    )
