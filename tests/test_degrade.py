"""Graded degradations for validating feature extractors: shape, range, strength grows with the level."""

from __future__ import annotations

import pytest
import torch

from atelier.metrics.degrade import DEGRADATIONS, shuffle_patches


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8, generator=g), size=64, mode="bilinear")
    return smooth.clamp(0, 1)


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_each_degradation_keeps_shape_and_range_and_grows_with_its_level(name: str) -> None:
    x = _images()
    fn, levels = DEGRADATIONS[name]
    errors = []
    for level in levels:
        y = fn(x, level, generator=torch.Generator().manual_seed(1))
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= 0 and y.max() <= 1
        errors.append(float((y - x).pow(2).mean()))
    assert errors[0] > 0
    assert errors == sorted(errors), errors  # mild to strong


def test_shuffled_patches_move_tiles_without_changing_them() -> None:
    x = _images()
    y = shuffle_patches(x, 16, generator=torch.Generator().manual_seed(0))
    tiles = lambda t: t.unfold(2, 16, 16).unfold(3, 16, 16).reshape(4, 3, 16, 256).permute(0, 2, 1, 3)  # noqa: E731
    for i in range(4):  # the same 16 tiles per image, in another order
        a, b = tiles(x)[i].flatten(1), tiles(y)[i].flatten(1)
        assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))
    assert not torch.equal(x, y)
    assert torch.equal(shuffle_patches(x, 64), x)  # one tile: nothing moves
    with pytest.raises(ValueError, match="patch=24 px must divide"):
        shuffle_patches(x, 24)
