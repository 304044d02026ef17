"""Where the cells of a map sit in the image, and resampling between such grids.

Convention: pixel k of an image covers [k − ½, k + ½], so its centre is at coordinate k. A map's
`Grid` says that its cell (i, j) is centred at image coordinate (offset_y + stride_y·i,
offset_x + stride_x·j). Every resize of a feature or score map goes through `resample`, which
samples the source map at the target grid's cell centres, so a value never moves in the image.

Why this exists: `F.interpolate(align_corners=False)` assumes cell i of an n-cell map over S pixels
is centred at (i + ½)·S/n − ½. A stride-2 convolution with symmetric padding centres output i on
input pixel 2i, and trained weights pull it further; the error grows with depth (efficientnet_lite0:
about 2, 7 and 12 px for its stride-4, 8 and 16 layers), so maps drew defects ~10 px down-right.
`even_grid` is that old assumption, kept as `backbone.alignment=legacy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from texad.errors import TexadError

__all__ = ["Grid", "PIXELS", "RESAMPLE_MODES", "even_grid", "resample", "sampling_matrix"]

RESAMPLE_MODES = ("bilinear", "nearest", "area")


@dataclass(frozen=True)
class Grid:
    """Cell (i, j) of a map is centred at image coordinate (offset[0] + stride[0]·i, offset[1] + stride[1]·j)."""

    stride: tuple[float, float]
    offset: tuple[float, float]

    def cropped(self, cells: tuple[int, int], pixels: tuple[float, float]) -> "Grid":
        """The grid after dropping `cells` leading cells of the map and `pixels` leading pixels of the image
        (e.g. the cropped margin of a padded input): cell i is the old cell i + cells, in the new origin."""
        return Grid(
            self.stride,
            tuple(o + s * c - p for o, s, c, p in zip(self.offset, self.stride, cells, pixels)),
        )

    def through_resize(self, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> "Grid":
        """This grid, given on an image resized from `original_hw` to `resized_hw` (bilinear, half-pixel
        convention as `F.interpolate(align_corners=False)` and cv2.resize), in the original image."""
        ratio = [o / r for o, r in zip(original_hw, resized_hw)]
        return Grid(
            tuple(s * q for s, q in zip(self.stride, ratio)),
            tuple((o + 0.5) * q - 0.5 for o, q in zip(self.offset, ratio)),
        )


#: the image's own pixels
PIXELS = Grid((1.0, 1.0), (0.0, 0.0))


def even_grid(cells: tuple[int, int], size: tuple[int, int]) -> Grid:
    """The grid `F.interpolate(align_corners=False)` assumes: `cells` spread evenly over `size` pixels."""
    stride = tuple(s / n for s, n in zip(size, cells))
    return Grid(stride, tuple((s - 1.0) / 2.0 for s in stride))


@lru_cache(maxsize=256)
def _axis_matrix(n_src: int, src_stride: float, src_offset: float, n_tgt: int, tgt_stride: float,
                 tgt_offset: float, mode: str) -> torch.Tensor:
    """(n_tgt, n_src) float64 weights; row t samples the source axis at target cell t's centre."""
    centres = tgt_offset + tgt_stride * torch.arange(n_tgt, dtype=torch.float64)
    weights = torch.zeros(n_tgt, n_src, dtype=torch.float64)
    rows = torch.arange(n_tgt)
    if mode == "area":
        # each target cell averages the source cells its own extent [c − s/2, c + s/2] overlaps
        # (source cell k covers [centre_k − stride/2, centre_k + stride/2]), by overlap length
        src_centres = src_offset + src_stride * torch.arange(n_src, dtype=torch.float64)
        lo = torch.maximum((centres - tgt_stride / 2)[:, None], (src_centres - src_stride / 2)[None])
        hi = torch.minimum((centres + tgt_stride / 2)[:, None], (src_centres + src_stride / 2)[None])
        weights = (hi - lo).clamp_min(0.0)
        empty = weights.sum(1) <= 0
        if empty.any():  # a target cell outside the source: the nearest source cell
            u = ((centres[empty] - src_offset) / src_stride).round().clamp(0, n_src - 1).long()
            weights[empty.nonzero()[:, 0], u] = 1.0
        return weights / weights.sum(1, keepdim=True)
    u = ((centres - src_offset) / src_stride).clamp(0.0, n_src - 1.0)  # beyond the outer cells: their value
    if mode == "nearest":
        weights[rows, torch.floor(u + 0.5).clamp(max=n_src - 1).long()] = 1.0
        return weights
    low = torch.floor(u).long().clamp(max=max(n_src - 2, 0))
    frac = u - low
    weights[rows, low] += 1.0 - frac
    if n_src > 1:
        weights[rows, low + 1] += frac
    return weights


def sampling_matrix(n_src: int, src_stride: float, src_offset: float, n_tgt: int, tgt_stride: float,
                    tgt_offset: float, mode: str = "bilinear") -> torch.Tensor:
    """One axis of `resample` as a matrix: (n_tgt, n_src) float64, each row summing to 1."""
    if mode not in RESAMPLE_MODES:
        raise TexadError(f"resample mode must be one of {list(RESAMPLE_MODES)}, got {mode!r}")
    if n_src < 1 or n_tgt < 1:
        raise TexadError(f"cannot resample between {n_src} and {n_tgt} cells")
    key = (int(n_src), float(src_stride), float(src_offset), int(n_tgt), float(tgt_stride), float(tgt_offset), mode)
    return _axis_matrix(*key)


def resample(maps: torch.Tensor, source: Grid, size: tuple[int, int], target: Grid = PIXELS,
             mode: str = "bilinear") -> torch.Tensor:
    """`maps` (..., h, w) on `source` → (..., size[0], size[1]) on `target`.

    bilinear: linear interpolation in the source's cell coordinates at each target centre, the outer
    cells' values beyond them (border clamp); nearest: the closest source cell; area: the mean of the
    source over each target cell's extent (e.g. a mask's coverage of a feature cell). Separable: one
    small matrix per axis, applied as two matrix products.
    """
    if maps.ndim < 2:
        raise TexadError(f"resample needs maps of shape (..., h, w), got {tuple(maps.shape)}")
    h, w = maps.shape[-2:]
    size = (int(size[0]), int(size[1]))
    dtype = maps.dtype if maps.is_floating_point() else torch.float32
    if source == target and size == (h, w):
        return maps.to(dtype)
    rows = sampling_matrix(h, source.stride[0], source.offset[0], size[0], target.stride[0], target.offset[0], mode)
    cols = sampling_matrix(w, source.stride[1], source.offset[1], size[1], target.stride[1], target.offset[1], mode)
    x = torch.matmul(rows.to(device=maps.device, dtype=dtype), maps.to(dtype))
    return torch.matmul(x, cols.t().to(device=maps.device, dtype=dtype))
