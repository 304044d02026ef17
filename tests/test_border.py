"""The border-ring ratio every method's border test uses, against a direct loop."""

from __future__ import annotations

import pytest
import torch

from texad.errors import TexadError
from texad.metrics.border import ring_ratio, ring_width


def test_ring_ratio_equals_a_pixel_loop():
    torch.manual_seed(0)
    maps = torch.rand(3, 20, 24) + 2.0
    ring = 3
    border, inner = [], []
    for m in maps:
        m = m - m.min()
        for y in range(20):
            for x in range(24):
                at_border = y < ring or y >= 20 - ring or x < ring or x >= 24 - ring
                (border if at_border else inner).append(float(m[y, x]))
    expected = (sum(border) / len(border)) / (sum(inner) / len(inner))
    assert ring_ratio(maps, ring) == pytest.approx(expected, rel=1e-12)


def test_ring_ratio_sees_a_hot_border_and_a_flat_map():
    maps = torch.ones(2, 64, 64)
    maps[:, :4] = 3.0
    assert ring_ratio(maps) > 1.5
    flat = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(1))
    assert ring_ratio(flat) == pytest.approx(1.0, abs=0.05)
    assert ring_width(256) == 16 and ring_width(64) == 4


def test_ring_ratio_rejects_bad_shapes():
    with pytest.raises(TexadError, match="shape"):
        ring_ratio(torch.zeros(8, 8))
    with pytest.raises(TexadError, match="does not fit"):
        ring_ratio(torch.zeros(1, 8, 8), ring=4)


def test_padded_features_crop_back_exactly_to_the_unpadded_cells():
    import torch.nn.functional as F

    from texad.backbones import padded_features

    from texad.geometry import even_grid

    def extract(x):  # two "layers" without padding of their own: every cell sees only its own pixels
        maps = [F.avg_pool2d(x, 4), F.avg_pool2d(x, 8)]
        return maps, [even_grid(tuple(m.shape[-2:]), tuple(x.shape[-2:])) for m in maps]

    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    plain, plain_grids = extract(images)
    for mode in ("reflect", "replicate", "zeros"):
        padded, grids = padded_features(extract, images, 16, mode)
        assert grids == plain_grids  # the cropped cells sit where the unpadded ones do
        for a, b in zip(plain, padded):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(plain, padded_features(extract, images, 0)[0]))
    with pytest.raises(TexadError, match="multiple of every feature stride"):
        padded_features(extract, images, 12)
    with pytest.raises(TexadError, match="input_padding_mode"):
        padded_features(extract, images, 16, "wrap")


def test_input_padding_removes_a_zero_padding_border_artifact():
    """A 3×3 zero-padded conv makes border cells of a flat image unlike the interior; padding fixes it."""
    import torch.nn.functional as F

    from texad.backbones import padded_features

    from texad.geometry import PIXELS

    weight = torch.ones(1, 3, 3, 3) / 27

    def extract(x):
        return [F.conv2d(x, weight, padding=1)], [PIXELS]

    flat = torch.ones(1, 3, 32, 32)
    plain = extract(flat)[0][0][0, 0]
    assert plain[0, 0] < plain[16, 16]  # the corner sees zeros
    fixed = padded_features(extract, flat, 4, "reflect")[0][0][0, 0]
    assert torch.allclose(fixed, torch.ones_like(fixed))
