"""Where a map draws the defects: the shift between anomaly maps and their ground truth.

For a defective image and a shift (dy, dx), |dy|, |dx| <= `max_shift`, the *alignment score* is the
mean of the z-scored map (map − its mean, over its std) under the ground-truth mask moved by (dy, dx);
pixels moved out of the image count as 0 (the z-scored map's mean), so leaving the image is neither
rewarded nor punished. Positive dy, dx: the map's heat lies down / right of the defects.

`map_offset` of a set is the shift that maximises the alignment score summed over its defective
images, refined to sub-pixel by a parabola through the peak and its neighbours on each axis. (The
median of each image's own best shift is far noisier: a defect the map misses has its best shift
anywhere in the window, and integer medians of ~40 images move by ±1.5 px between runs.)

A diagnostic of geometry (a map drawn in the wrong place), never a score to select on. The scores of
all shifts come at once from a cross-correlation by FFT, checked against a loop over shifts in the tests.
"""

from __future__ import annotations

import math

import torch

from texad.errors import TexadError

__all__ = ["MAX_SHIFT", "alignment_scores", "best_shifts", "defect_alignment", "offset_record", "pooled_offset",
           "scaled_max_shift"]

#: shifts searched per axis, in pixels at 256² (scaled with the image side)
MAX_SHIFT = 24


def alignment_scores(maps: torch.Tensor, masks: torch.Tensor, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """(B, H, W) maps and 0/1 masks → (B, 2s+1, 2s+1) alignment scores; rows dy = −s..s, columns dx.
    NaN for an image whose mask is empty or whose map is constant (no place to find)."""
    if maps.shape != masks.shape or maps.ndim != 3:
        raise TexadError(f"map offset needs maps and masks of one shape (B, H, W), got {tuple(maps.shape)} "
                         f"and {tuple(masks.shape)}")
    b, h, w = maps.shape
    s = int(max_shift)
    x = maps.detach().double()
    std = x.flatten(1).std(1)
    z = (x - x.flatten(1).mean(1)[:, None, None]) / std.clamp_min(1e-12)[:, None, None]
    m = (masks.detach() > 0).double()
    area = m.flatten(1).sum(1)
    # corr[dy, dx] = Σ_p z[p + d] m[p]: circular cross-correlation on a canvas large enough that no
    # shift within ±s wraps around (H + s rows)
    size = (h + s, w + s)
    corr = torch.fft.irfft2(torch.fft.rfft2(z, s=size) * torch.fft.rfft2(m, s=size).conj(), s=size)
    shifts = torch.arange(-s, s + 1)
    window = corr[:, shifts % size[0]][:, :, shifts % size[1]] / area.clamp_min(1.0)[:, None, None]
    window[(area <= 0) | (std <= 1e-12)] = float("nan")
    return window


def best_shifts(maps: torch.Tensor, masks: torch.Tensor, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """(B, 2) each image's own best integer (dy, dx); NaN rows where there is no place to find."""
    window = alignment_scores(maps, masks, max_shift)
    s = (window.shape[-1] - 1) // 2
    flat = window.flatten(1).nan_to_num(float("-inf")).argmax(1)
    out = torch.stack([flat // (2 * s + 1) - s, flat % (2 * s + 1) - s], 1).double()
    out[torch.isnan(window.flatten(1)).any(1)] = float("nan")
    return out


def pooled_offset(window_sum: torch.Tensor) -> list[float]:
    """[dy, dx] maximising summed alignment scores (2s+1, 2s+1), with a parabolic sub-pixel peak per axis."""
    s = (window_sum.shape[-1] - 1) // 2
    iy, ix = divmod(int(window_sum.flatten().argmax()), 2 * s + 1)

    def vertex(lo: float, mid: float, hi: float) -> float:
        curvature = lo - 2 * mid + hi
        return 0.0 if curvature >= 0 else 0.5 * (lo - hi) / curvature

    dy = iy - s + (vertex(*window_sum[iy - 1:iy + 2, ix].tolist()) if 0 < iy < 2 * s else 0.0)
    dx = ix - s + (vertex(*window_sum[iy, ix - 1:ix + 2].tolist()) if 0 < ix < 2 * s else 0.0)
    return [float(dy), float(dx)]


def scaled_max_shift(side: int) -> int:
    """MAX_SHIFT at 256 px, proportional for other sides (at least 2)."""
    return max(2, int(math.ceil(MAX_SHIFT * side / 256)))


def defect_alignment(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Summed `alignment_scores` of the images whose mask holds a defect (±24 px at 256²), and their number
    in a (1 + (2s+1)²) vector, so batches add up."""
    masks = masks.reshape(maps.shape)
    s = scaled_max_shift(min(maps.shape[-2:]))
    defective = masks.flatten(1).amax(1) > 0
    if not bool(defective.any()):
        return torch.zeros(1 + (2 * s + 1) ** 2, dtype=torch.float64)
    window = alignment_scores(maps[defective], masks[defective], s)
    valid = ~torch.isnan(window.flatten(1)).any(1)
    return torch.cat([valid.sum().double()[None], window[valid].sum(0).flatten()])


def offset_record(summed: torch.Tensor | None) -> dict[str, float | None]:
    """metrics.json keys `map_offset_dy`, `map_offset_dx` from accumulated `defect_alignment` (None
    without a defective image)."""
    if summed is None or float(summed[0]) == 0:
        return {"map_offset_dy": None, "map_offset_dx": None}
    side = int(round((summed.numel() - 1) ** 0.5))
    dy, dx = pooled_offset(summed[1:].view(side, side))
    return {"map_offset_dy": round(dy, 2), "map_offset_dx": round(dx, 2)}
