"""DiffAugment: shapes, what each policy does, differentiability, and policy parsing."""

from __future__ import annotations

import pytest
import torch

from atelier.augment.diffaugment import diff_augment, parse_policy, rand_cutout, rand_translation


def test_policy_parsing_and_errors() -> None:
    assert parse_policy("color, translation,cutout") == ("color", "translation", "cutout")
    assert parse_policy(None) == () == parse_policy("")
    with pytest.raises(ValueError, match=r"model\.diffaugment=.*'flip'"):
        parse_policy("color,flip")


def test_translation_moves_content_and_pads_with_zeros() -> None:
    torch.manual_seed(0)
    x = torch.ones(64, 1, 16, 16)
    out = rand_translation(x)
    assert out.shape == x.shape
    # each image is shifted by at most 2 px (1/8 of 16): at least 14x14 of the ones survive
    kept = out.sum(dim=(1, 2, 3))
    assert kept.min() >= 14 * 14 and kept.max() <= 16 * 16
    assert (kept < 256).any(), "no image was shifted"
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_cutout_zeroes_a_quarter_of_the_pixels_at_most() -> None:
    torch.manual_seed(0)
    x = torch.ones(64, 3, 16, 16)
    out = rand_cutout(x)
    zeroed = (out[:, 0] == 0).flatten(1).sum(1).float()
    assert zeroed.max() <= 64 and zeroed.mean() > 20  # an 8x8 square, partly outside the image sometimes
    assert torch.equal(out[:, 0], out[:, 2])  # same square in every channel


def test_all_policies_keep_shape_and_gradients() -> None:
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    out = diff_augment(x, parse_policy("color,translation,cutout"))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grey = diff_augment(torch.randn(4, 1, 8, 8), ("color",))  # saturation skipped for 1 channel
    assert grey.shape == (4, 1, 8, 8)
