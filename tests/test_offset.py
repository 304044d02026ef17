"""map_offset: alignment scores against a loop over shifts, and the pooled offset of displaced maps."""

from __future__ import annotations

import torch

from texad.metrics.offset import alignment_scores, best_shifts, defect_alignment, offset_record


def loop_scores(amap: torch.Tensor, mask: torch.Tensor, s: int) -> torch.Tensor:
    """Mean z-scored map under the mask moved by (dy, dx), pixels moved out counting 0: one shift at a time."""
    z = (amap.double() - amap.double().mean()) / amap.double().std()
    ys, xs = mask.nonzero(as_tuple=True)
    out = torch.empty(2 * s + 1, 2 * s + 1, dtype=torch.float64)
    h, w = amap.shape
    for i, dy in enumerate(range(-s, s + 1)):
        for j, dx in enumerate(range(-s, s + 1)):
            yy, xx = ys + dy, xs + dx
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            out[i, j] = z[yy[inside], xx[inside]].sum() / len(ys)
    return out


def test_alignment_scores_equal_a_loop_over_shifts():
    torch.manual_seed(0)
    maps, masks = torch.rand(3, 40, 36), torch.zeros(3, 40, 36)
    masks[0, 10:15, 12:20] = 1
    masks[1, 30:38, 0:5] = 1
    masks[2, 0:3, 30:36] = 1
    maps[0, 13:18, 15:23] += 2  # drawn 3 px down and 3 px right of its mask
    fast = alignment_scores(maps, masks, 6)
    for i in range(3):
        assert torch.allclose(fast[i], loop_scores(maps[i], masks[i] > 0, 6), atol=1e-9)
    assert best_shifts(maps, masks, 6)[0].tolist() == [3.0, 3.0]


def test_empty_masks_and_flat_maps_have_no_offset():
    maps, masks = torch.rand(2, 16, 16), torch.zeros(2, 16, 16)
    masks[1, 4:8, 4:8] = 1
    maps[1] = 0.5
    assert torch.isnan(best_shifts(maps, masks, 3)).all()
    assert offset_record(defect_alignment(maps, masks)) == {"map_offset_dy": None, "map_offset_dx": None}


def blobs(centres: list[tuple[float, float]], side: int = 64, sigma: float = 3.0) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(side).double(), torch.arange(side).double(), indexing="ij")
    return torch.stack([torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2)) for cy, cx in centres])


def test_pooled_offset_finds_a_sub_pixel_displacement_over_batches():
    gen = torch.Generator().manual_seed(1)
    centres = (torch.rand(12, 2, generator=gen) * 30 + 17).tolist()
    masks = blobs(centres, sigma=2.0) > 0.5  # discs of radius ~2.4 px
    maps = blobs([(cy + 2.6, cx - 1.3) for cy, cx in centres]) + 0.02 * torch.rand(12, 64, 64, generator=gen)
    whole = offset_record(defect_alignment(maps.float(), masks.float()))
    parts = defect_alignment(maps[:5].float(), masks[:5].float()) + defect_alignment(maps[5:].float(), masks[5:].float())
    assert offset_record(parts) == whole
    assert abs(whole["map_offset_dy"] - 2.6) < 0.35 and abs(whole["map_offset_dx"] + 1.3) < 0.35, whole
