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
