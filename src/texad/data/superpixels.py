"""Superpixel views for Sp-CFA: SLIC labels, the tile mosaic, and its inverse (data preparation).

Follows Rafiei et al., IJCNN 2024, Sec. III-B/C (no official code is public); deviations: the
``fill`` of the free mosaic area (below) and CIELAB input to SLIC for RGB images.

The pre-processing unit of Sp-CFA cuts each image into SLIC superpixels, resizes the bounding
rectangle of every superpixel (bicubic) to a square tile, and lays the tiles out row by row in an
image of the original size; what no tile covers is filled (below). The post-processing unit undoes this on the
score map: each original pixel reads the tile of its own superpixel at the place the forward
resize put it.

Tiling rule (square and non-square images alike): tiles are square with side ``s``, the largest
integer for which ``(H // s) * (W // s) >= n`` (n = number of slots, one per label id). Tiles fill
``W // s`` columns per row, left to right, top to bottom; label ``i`` takes slot ``i``. Since
``n <= H * W``, ``s >= 1`` always, so every superpixel gets a tile. The rule lives in
:func:`tile_grid` and both the numpy mosaic and the torch inverse call it.

Which superpixel gets which slot is a relabelling done before the mosaic. SLIC's own ids do not
follow the image: OpenCV's ``enforceLabelConnectivity`` renumbers the superpixels in raster order of
their first pixel, so "slot = SLIC id" lays a row of seeds out along their top edges and the mosaic
is a shuffle (gravel, rs 10: the source superpixels of mosaic-adjacent tiles lie 3.8-7.7 region
sizes apart). :func:`arrange_tiles` (texad's default, ``method.slic.mosaic_order=place``) gives each
superpixel the slot of its centroid's place (row band, then nearest free column), so the mosaic is
the image with every superpixel rescaled roughly in place (adjacent tiles' sources about 1-1.5
region sizes apart, across and down). ``mosaic_order=label`` keeps SLIC's ids (:func:`guard_corner`).

What the grid leaves free (slots without a tile, and the right and bottom strips) is ``fill``:

- ``"zeros"`` (the paper, Sec. III-B: "zero patches"): black. On the embedded 256² sets this is
  3–30 % of the mosaic (OpenCV's connectivity step merges superpixels, so n falls below the
  grid's slot count).
- ``"reflect"`` (texad's default): a free slot holds a real tile of its own row, mirrored across
  the row's first or last real tile (rows without one mirror the rows above), and the strips mirror
  the tile grid (``cv2.BORDER_REFLECT``), so every part of the mosaic looks like the texture nearby.
  The inverse never reads these pixels, so the fill only changes what the backbone, the memory bank
  and the training loss see next to (and instead of) a black block.

The mosaic's top-left corner is hot in every view (the backbone's own corner artifact, in mosaic
coordinates: with the tile order reversed on gravel the hot spot followed the corner, not
superpixel 0). Both orders take a guard (texad's default, 32 px): the slots of that corner square
stay free; the inverse only needs the labels, so it is unchanged. Guard 0, fill "zeros" and order
"label" give the paper's mosaic.

SLIC and :func:`build_mosaic` use numpy and OpenCV only, so they run in DataLoader workers;
:func:`inverse_mosaic` is batched torch on any device.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from texad.errors import TexadError
from texad.outputs import follow_umask, read_npz_array
from texad.outputs import digest

__all__ = [
    "MOSAIC_FILLS",
    "MosaicLayout",
    "arrange_tiles",
    "SuperpixelCache",
    "build_mosaic",
    "guard_corner",
    "inverse_mosaic",
    "mosaic_layout",
    "slic_labels",
    "tile_grid",
]


# --------------------------------------------------------------------------------------------
# SLIC
# --------------------------------------------------------------------------------------------


def _check_uint8_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TexadError(f"SLIC expects a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise TexadError(
            f"SLIC expects a (H,W) grayscale or (H,W,3) RGB image, got shape {image.shape}"
        )
    if image.dtype != np.uint8:
        raise TexadError(f"SLIC expects a uint8 image, got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise TexadError(f"SLIC got an empty image of shape {image.shape}")
    return image


def slic_labels(
    image: np.ndarray,
    region_size: int,
    ruler: float = 10.0,
    iterations: int = 10,
    min_element_size: int | None = 25,
) -> np.ndarray:
    """OpenCV SLIC superpixels of one image as contiguous int32 labels 0..n-1, shape (H, W).

    RGB images are clustered in CIELAB (OpenCV's SLIC measures colour distance as plain
    Euclidean distance, which is only perceptual in LAB); grayscale is used as is.
    ``min_element_size`` (percent of the region size, OpenCV's default 25) calls
    ``enforceLabelConnectivity``: without it OpenCV SLIC leaves many stray fragments per label,
    whose bounding rectangles then span much of the image and blur the mosaic tiles. Pass None
    to skip it. The label count is only known after SLIC, hence the per-image tile geometry.
    """
    image = _check_uint8_image(image)
    height, width = image.shape[:2]
    if isinstance(region_size, bool) or not isinstance(region_size, (int, np.integer)):
        raise TexadError(f"SLIC region_size must be an int, got {region_size!r}")
    if region_size <= 0 or region_size > min(height, width):
        raise TexadError(
            f"SLIC region_size={region_size} must be in 1..{min(height, width)} "
            f"for an image of size {height}x{width} (HxW)"
        )
    if iterations < 1:
        raise TexadError(f"SLIC iterations={iterations} must be >= 1")
    if ruler <= 0:
        raise TexadError(f"SLIC ruler={ruler} must be > 0")

    features = cv2.cvtColor(image, cv2.COLOR_RGB2LAB) if image.ndim == 3 else image
    slic = cv2.ximgproc.createSuperpixelSLIC(
        np.ascontiguousarray(features),
        algorithm=cv2.ximgproc.SLIC,
        region_size=int(region_size),
        ruler=float(ruler),
    )
    slic.iterate(int(iterations))
    if min_element_size is not None:
        slic.enforceLabelConnectivity(int(min_element_size))
    labels = slic.getLabels()
    # OpenCV may leave unused label ids; the mosaic needs one slot per present label.
    _, contiguous = np.unique(labels, return_inverse=True)
    return contiguous.reshape(height, width).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Tile geometry (shared by the numpy mosaic and the torch inverse)
# --------------------------------------------------------------------------------------------


def tile_grid(height: int, width: int, count: int) -> tuple[int, int]:
    """(tile side, tiles per row) for ``count`` square tiles in a height x width image.

    The side is the largest that still fits all tiles, so small superpixel counts get big tiles.
    """
    if count < 1 or count > height * width:
        raise TexadError(
            f"cannot tile {count} superpixels into an image of size {height}x{width}"
        )
    side = min(math.isqrt(height * width // count), height, width)
    while (height // side) * (width // side) < count:
        side -= 1
    return side, width // side


def guard_corner(labels: np.ndarray, guard: int) -> np.ndarray:
    """Relabel contiguous superpixels so no real tile lies in the mosaic's top-left guard×guard px.

    The mosaic's corner is where the backbone's own border artifact sits (hot in every view, in
    mosaic coordinates: with the tile order reversed the hot spot follows the corner, not
    superpixel 0). Label ids are slot indices, so the ids of the slots whose tile would start inside
    the guard square are left unused (free slots, `mosaic_layout(free_slots=True)`), and superpixel
    j takes the j-th remaining slot. The tile side follows from the new count (max id + 1) by
    `tile_grid`, exactly as the inverse recomputes it; the side is iterated to its fixed point (it
    can only shrink, so this ends). ``guard`` 0, or too few superpixels to fill the guarded rows,
    returns the labels unchanged (the paper's layout).
    """
    labels = _check_labels(labels)
    if guard <= 0:
        return labels
    height, width = labels.shape
    n = int(labels.max()) + 1
    side = tile_grid(height, width, n)[0]
    while True:
        columns, rows = width // side, height // side
        k_r, k_c = min(-(-guard // side), rows), min(-(-guard // side), columns)
        count = n + k_r * k_c
        if count > height * width:
            return labels
        new_side = tile_grid(height, width, count)[0]
        if new_side == side:
            break
        side = new_side
    slots = np.arange(rows * columns).reshape(rows, columns)
    guarded = np.zeros_like(slots, dtype=bool)
    guarded[:k_r, :k_c] = True
    real = slots[~guarded]
    if n <= k_r * (columns - k_c):  # the last id would be a guard slot: count would not hold
        return labels
    return real[:n][labels].astype(labels.dtype)


def _guarded_grid(height: int, width: int, n: int, guard: int) -> tuple[int, int, int, int, int]:
    """(side, rows, columns, k_r, k_c): the tile grid for n tiles plus a k_r × k_c free corner block.

    ``tile_grid`` of the total slot count, iterated to its fixed point (the side only shrinks);
    k_r = k_c = 0 when ``guard`` is 0 or the corner block does not fit.
    """
    side = tile_grid(height, width, n)[0]
    if guard <= 0:
        return side, height // side, width // side, 0, 0
    while True:
        rows, columns = height // side, width // side
        k_r, k_c = min(-(-guard // side), rows), min(-(-guard // side), columns)
        count = n + k_r * k_c
        if count > height * width or k_r * k_c >= rows * columns:
            side = tile_grid(height, width, n)[0]
            return side, height // side, width // side, 0, 0
        new_side = tile_grid(height, width, count)[0]
        if new_side == side:
            return side, rows, columns, k_r, k_c
        side = new_side


def arrange_tiles(labels: np.ndarray, guard: int = 0) -> np.ndarray:
    """Relabel superpixels so label id = mosaic slot and a tile sits where its superpixel sits.

    texad's own layout (no paper detail fixes the order). The tile grid is `tile_grid`'s for the
    superpixels plus the slots of the guarded corner block (`guard` px, see `guard_corner`; 0: none).
    Slots are given by recursive bisection: the block of slots is halved along its longer side and
    each half gets as many superpixels, sorted by centroid along that axis, as its share of the
    block's usable slots (guard slots are not usable), down to one slot. So the order in the image
    is kept across and down, and the spare slots are spread where superpixels are sparse. Neighbours in the image are then neighbours in the mosaic, across
    and down, whatever SLIC's label numbering (OpenCV's connectivity step renumbers by first pixel).
    The last real slot + 1 gives back the same tile side through `tile_grid`, so the inverse
    (`inverse_mosaic`) needs only the labels, as before.
    """
    labels = _check_labels(labels)
    height, width = labels.shape
    flat = labels.ravel().astype(np.int64)
    n = int(flat.max()) + 1
    sizes = np.bincount(flat, minlength=n)
    if flat.min() < 0 or not (sizes > 0).all():
        raise TexadError(f"arrange_tiles expects contiguous labels 0..{n - 1}")
    ys, xs = np.divmod(np.arange(flat.size), width)
    cy = np.bincount(flat, weights=ys, minlength=n) / sizes
    cx = np.bincount(flat, weights=xs, minlength=n) / sizes
    side, rows, columns, k_r, k_c = _guarded_grid(height, width, n, guard)
    usable = np.full(rows, columns)
    usable[:k_r] -= k_c
    usable = np.ones((rows, columns), bool)
    usable[:k_r, :k_c] = False
    slot_of = np.empty(n, np.int64)
    # recursive bisection: halve the slot block along its longer side, give each half as many
    # superpixels (sorted by centroid along that axis) as its share of the block's usable slots
    stack = [(np.arange(n), 0, rows, 0, columns)]
    while stack:
        ids, r0, r1, c0, c1 = stack.pop()
        if ids.size == 0:
            continue
        if (r1 - r0) * (c1 - c0) == 1:
            slot_of[ids] = r0 * columns + c0  # one superpixel: capacities below keep it at most one
            continue
        if r1 - r0 >= c1 - c0:
            mid = (r0 + r1) // 2
            halves, key = ((r0, mid, c0, c1), (mid, r1, c0, c1)), cy
        else:
            mid = (c0 + c1) // 2
            halves, key = ((r0, r1, c0, mid), (r0, r1, mid, c1)), cx
        room = [int(usable[h[0] : h[1], h[2] : h[3]].sum()) for h in halves]
        first = min(room[0], max(ids.size - room[1], int(round(ids.size * room[0] / max(room[0] + room[1], 1)))))
        ids = ids[np.argsort(key[ids], kind="stable")]
        stack.append((ids[:first], *halves[0]))
        stack.append((ids[first:], *halves[1]))
    if tile_grid(height, width, int(slot_of.max()) + 1)[0] != side:
        # spare slots at the grid's end: the inverse would take the count for a bigger side. The
        # last tile moves to the last slot (same bottom-right block), so max id + 1 = rows * columns
        slot_of[int(np.argmax(slot_of))] = rows * columns - 1
    if tile_grid(height, width, int(slot_of.max()) + 1)[0] != side:
        raise TexadError(f"arrange_tiles: internal layout error for {n} superpixels in {height}x{width}")
    return slot_of[labels].astype(labels.dtype)


@dataclass(frozen=True)
class MosaicLayout:
    """Where each superpixel comes from and where its tile goes.

    ``rects[i] = (y0, x0, h, w)`` is the bounding rectangle of superpixel i in the image;
    ``tiles[i] = (ty, tx)`` is the top-left corner of its ``tile_side`` square in the mosaic.
    """

    height: int
    width: int
    tile_side: int
    columns: int
    rects: np.ndarray
    tiles: np.ndarray

    @property
    def count(self) -> int:
        return len(self.rects)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    if not isinstance(labels, np.ndarray) or labels.ndim != 2 or labels.size == 0:
        shape = getattr(labels, "shape", None)
        raise TexadError(f"superpixel labels must be a non-empty (H,W) array, got shape {shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TexadError(f"superpixel labels must be integers, got dtype {labels.dtype}")
    return labels


def mosaic_layout(labels: np.ndarray, free_slots: bool = False) -> MosaicLayout:
    """Bounding rectangles and tile slots of labels 0..n-1: label i goes to slot i.

    Labels from `slic_labels` are contiguous. With ``free_slots`` an id without pixels is allowed
    and marks a free slot (no tile; its rectangle is (0, 0, 0, 0)): `guard_corner` uses this to keep
    the mosaic's top-left corner free of real tiles. The inverse needs nothing extra, since it
    reads slot i only for the pixels of label i.
    """
    labels = _check_labels(labels)
    height, width = labels.shape
    flat = labels.ravel().astype(np.int64)
    if flat.min() < 0:
        raise TexadError(f"superpixel labels must be >= 0, got minimum {flat.min()}")
    count = int(flat.max()) + 1
    sizes = np.bincount(flat, minlength=count)
    present = sizes > 0
    if not free_slots and not present.all():
        missing = np.flatnonzero(~present)[:5].tolist()
        raise TexadError(
            f"superpixel labels must be contiguous 0..{count - 1}; missing e.g. {missing}"
        )

    # Group pixel coordinates by label, then reduce each group to its min / max.
    order = np.argsort(flat, kind="stable")
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))[present]
    ys, xs = np.divmod(order, width)
    rects = np.zeros((count, 4), np.int64)
    y0 = np.minimum.reduceat(ys, starts)
    y1 = np.maximum.reduceat(ys, starts)
    x0 = np.minimum.reduceat(xs, starts)
    x1 = np.maximum.reduceat(xs, starts)
    rects[present] = np.stack([y0, x0, y1 - y0 + 1, x1 - x0 + 1], axis=1)

    side, columns = tile_grid(height, width, count)
    slot = np.arange(count)
    tiles = np.stack([(slot // columns) * side, (slot % columns) * side], axis=1)
    return MosaicLayout(height, width, side, columns, rects, tiles.astype(np.int64))


# --------------------------------------------------------------------------------------------
# Forward: image -> mosaic
# --------------------------------------------------------------------------------------------


MOSAIC_FILLS = ("reflect", "zeros")


def build_mosaic(image: np.ndarray, labels: np.ndarray, fill: str = "reflect") -> np.ndarray:
    """The superpixel view of ``image``: each superpixel's rectangle, bicubic-resized to its tile.

    ``image`` is (H,W) or (H,W,C), uint8 / float32 / float64; the mosaic has the same shape and
    dtype. What no tile covers is ``fill`` (module docstring): ``"zeros"`` as in the paper, or
    ``"reflect"``. Bicubic overshoot is clipped to 0..255 for uint8 by OpenCV.
    """
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3):
        shape = getattr(image, "shape", None)
        raise TexadError(f"build_mosaic expects a (H,W) or (H,W,C) image, got shape {shape}")
    if image.dtype not in (np.uint8, np.float32, np.float64):
        raise TexadError(f"build_mosaic expects uint8 or float images, got dtype {image.dtype}")
    if fill not in MOSAIC_FILLS:
        raise TexadError(f"mosaic fill must be one of {list(MOSAIC_FILLS)} (method.slic.mosaic_fill), got {fill!r}")
    labels = _check_labels(labels)
    if labels.shape != image.shape[:2]:
        raise TexadError(
            f"labels shape {labels.shape} does not match image size {image.shape[:2]}"
        )
    layout = mosaic_layout(labels, free_slots=True)
    side = layout.tile_side
    mosaic = np.zeros_like(image)
    for (y0, x0, h, w), (ty, tx) in zip(layout.rects.tolist(), layout.tiles.tolist()):
        if h == 0:  # a free slot (guard_corner): filled below
            continue
        rect = image[y0 : y0 + h, x0 : x0 + w]
        tile = cv2.resize(rect, (side, side), interpolation=cv2.INTER_CUBIC)
        target = mosaic[ty : ty + side, tx : tx + side]
        target[...] = tile.reshape(target.shape)  # cv2 drops a single channel axis
    if fill == "zeros":
        return mosaic
    rows, columns = layout.height // side, layout.columns
    real = np.zeros(rows * columns, bool)
    real[: layout.count] = layout.rects[:, 2] > 0
    _reflect_free_slots(mosaic, real.reshape(rows, columns), side)
    grid_h, grid_w = rows * side, columns * side
    if (grid_h, grid_w) != (layout.height, layout.width):  # strips: mirror the tile grid
        grid = np.ascontiguousarray(mosaic[:grid_h, :grid_w])
        full = cv2.copyMakeBorder(
            grid, 0, layout.height - grid_h, 0, layout.width - grid_w, cv2.BORDER_REFLECT
        )
        mosaic[...] = full.reshape(mosaic.shape)
    return mosaic


def _reflect_free_slots(mosaic: np.ndarray, real: np.ndarray, side: int) -> None:
    """Fill the free slots of a (rows, columns) slot grid in place with mirrored real tiles.

    Within a row, a free slot left of the row's first real tile or right of its last one takes the
    real tile mirrored across that edge (slot a-1-d copies a+d; b+1+d copies b-d), clamped to the
    row's real run; a free slot between real tiles copies the nearest real tile to its left. A row
    without a real tile copies the filled row mirrored across the last row that has one. So a free
    slot shows a tile from its own neighbourhood of the mosaic, never one from elsewhere.
    """
    rows, columns = real.shape

    def cell(r: int, c: int) -> np.ndarray:
        return mosaic[r * side : (r + 1) * side, c * side : (c + 1) * side]

    filled = []
    for r in range(rows):
        cols = np.flatnonzero(real[r])
        if cols.size == 0:
            continue
        filled.append(r)
        first, last = int(cols[0]), int(cols[-1])
        for c in range(columns):
            if real[r, c]:
                continue
            if c < first:
                source = min(first + (first - 1 - c), last)
            elif c > last:
                source = max(last - (c - last - 1), first)
            else:
                source = int(cols[cols < c][-1])
            while not real[r, source]:  # clamped into a gap of the run: step towards the edge tile
                source += 1 if c < first else -1
            cell(r, c)[...] = cell(r, source)
    if not filled:
        return
    top, bottom = filled[0], filled[-1]
    for r in range(rows):
        if r in filled:
            continue
        source = top + (top - 1 - r) if r < top else bottom - (r - bottom - 1)
        source = min(max(source, top), bottom)
        while source not in filled:
            source += 1 if r < top else -1
        mosaic[r * side : (r + 1) * side, : columns * side] = mosaic[source * side : (source + 1) * side, : columns * side]


# --------------------------------------------------------------------------------------------
# Inverse: score map on the mosaic -> score map on the image
# --------------------------------------------------------------------------------------------


def inverse_mosaic(mosaic_map: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bring a map computed on the mosaic back to original image coordinates.

    ``mosaic_map`` is (B,H,W) or (B,C,H,W) float, ``labels`` (B,H,W): label i is slot i (ids
    without pixels are free slots, see `guard_corner`; the count is max id + 1 per image).
    Every pixel (y, x) of superpixel i reads tile i where the forward resize put it: with
    rectangle (y0, x0, h, w) and tile side s, inside-tile column ``(x - x0 + 0.5) * s / w - 0.5``
    (the half-pixel convention of cv2.resize), clamped to the tile so neighbours never bleed in,
    sampled bilinearly. This is "resize tile back to rectangle, keep the superpixel's pixels,
    paste", done for all superpixels and images in one grid_sample.
    """
    if mosaic_map.ndim not in (3, 4):
        shape = tuple(mosaic_map.shape)
        raise TexadError(f"mosaic_map must be (B,H,W) or (B,C,H,W), got {shape}")
    squeeze = mosaic_map.ndim == 3
    maps = mosaic_map.unsqueeze(1) if squeeze else mosaic_map
    batch, _, height, width = maps.shape
    if labels.shape != (batch, height, width):
        raise TexadError(
            f"labels shape {tuple(labels.shape)} does not match map shape {tuple(mosaic_map.shape)}"
        )
    result_dtype = mosaic_map.dtype if mosaic_map.is_floating_point() else torch.float32
    # Sample in float32 at least: half-precision grid coordinates are off by ~0.25 px at 1024 px.
    coord_dtype = torch.float64 if maps.dtype == torch.float64 else torch.float32
    maps = maps.to(coord_dtype)
    device = maps.device

    labels = labels.to(device=device, dtype=torch.int64).reshape(batch, -1)
    counts = (labels.amax(dim=1) + 1).tolist()
    grids = [tile_grid(height, width, int(n)) for n in counts]

    # Batch-global superpixel ids so one scatter and one gather cover all images.
    offsets = torch.tensor([0] + counts[:-1], device=device, dtype=torch.int64).cumsum(0)
    ids = (labels + offsets[:, None]).reshape(-1)
    total = int(sum(counts))
    ys = torch.arange(height, device=device).repeat_interleave(width)
    xs = torch.arange(width, device=device).repeat(height)
    pixel_yx = torch.stack([ys, xs], dim=1).repeat(batch, 1)  # (B*H*W, 2)

    # Per superpixel: bounding rectangle (min / max of its pixel coordinates) ...
    index = ids[:, None].expand(-1, 2)
    low = torch.full((total, 2), max(height, width), device=device, dtype=torch.int64)
    low = low.scatter_reduce(0, index, pixel_yx, reduce="amin")
    high = torch.full((total, 2), -1, device=device, dtype=torch.int64)
    high = high.scatter_reduce(0, index, pixel_yx, reduce="amax")
    rect_size = high - low + 1
    # ... and its tile: slot i of a row-major grid of `columns` tiles per row (tile_grid).
    per_image = torch.tensor(counts, device=device)
    side = torch.tensor([g[0] for g in grids], device=device).repeat_interleave(per_image)
    columns = torch.tensor([g[1] for g in grids], device=device).repeat_interleave(per_image)
    slot = torch.arange(total, device=device) - offsets.repeat_interleave(per_image)
    tile_yx = torch.stack([slot // columns, slot % columns], dim=1) * side[:, None]

    side_f = side.to(coord_dtype)[:, None]
    scale = side_f / rect_size.to(coord_dtype)
    table = torch.cat([low.to(coord_dtype), scale, tile_yx.to(coord_dtype), side_f - 1], dim=1)
    # One gather: each pixel gets y0, x0, scale_y, scale_x, tile_y, tile_x, side-1 of its label.
    table = table[ids]

    # cv2.resize half-pixel convention, clamped inside the tile so neighbours never bleed in.
    in_tile = (pixel_yx.to(coord_dtype) - table[:, 0:2] + 0.5) * table[:, 2:4] - 0.5
    in_tile = torch.minimum(in_tile.clamp_min(0.0), table[:, 6:7])
    mosaic_yx = table[:, 4:6] + in_tile
    # Mosaic pixel coordinates -> grid_sample's [-1, 1] (align_corners=False: pixel centres).
    extent = torch.tensor([height, width], device=device, dtype=coord_dtype)
    grid_yx = (mosaic_yx + 0.5) * (2.0 / extent) - 1.0
    grid = grid_yx.flip(1).reshape(batch, height, width, 2)

    out = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.to(result_dtype)
    return out.squeeze(1) if squeeze else out


# --------------------------------------------------------------------------------------------
# Disk cache for labels
# --------------------------------------------------------------------------------------------


class SuperpixelCache:
    """SLIC labels computed once per (image, region size, SLIC settings) and kept on disk.

    SLIC dominates data loading time, and the same training images come back every epoch.
    The key covers the file (absolute path, mtime, size), the image actually segmented (shape,
    dtype and a digest of its pixels, so a different resize or crop of the same file never
    reuses stale labels), the region size and the SLIC settings. Random augmentation applied
    before SLIC therefore misses the cache every time. Writes go to a temp file in the cache
    directory and are moved in with os.replace, so concurrent DataLoader workers never read a
    half-written file; two workers racing on one key both write identical labels.
    """

    VERSION = 1

    def __init__(self, cache_dir: str | os.PathLike[str]):
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def key(self, image_path: str, image: np.ndarray, region_size: int, **slic_kwargs) -> str:
        path = os.path.abspath(os.fspath(image_path))
        try:
            stat = os.stat(path)
            file_id = [stat.st_mtime_ns, stat.st_size]
        except OSError:
            file_id = None
        pixels = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).hexdigest()
        description = {
            "version": self.VERSION,
            "path": path,
            "file": file_id,
            "shape": list(image.shape),
            "dtype": str(image.dtype),
            "pixels": pixels,
            "region_size": int(region_size),
            "slic": {name: slic_kwargs[name] for name in sorted(slic_kwargs)},
        }
        return digest(description)

    def path_for(self, key: str) -> Path:
        return self.cache_dir / f"slic-{key}.npz"

    def labels_for(
        self, image_path: str, image: np.ndarray, region_size: int, **slic_kwargs
    ) -> np.ndarray:
        """Cached :func:`slic_labels` of ``image`` (loaded from ``image_path``)."""
        target = self.path_for(self.key(image_path, image, region_size, **slic_kwargs))
        if target.exists():
            try:
                labels = read_npz_array(target, "labels")
                if labels.shape == image.shape[:2]:
                    return labels.astype(np.int32, copy=False)
            except (OSError, ValueError, KeyError, EOFError):
                pass  # unreadable entry: recompute and overwrite it
        labels = slic_labels(image, region_size, **slic_kwargs)
        self._write_atomic(target, labels)
        return labels

    def _write_atomic(self, target: Path, labels: np.ndarray) -> None:
        handle, temp = tempfile.mkstemp(dir=self.cache_dir, prefix=".slic-", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez_compressed(file, labels=labels)
            follow_umask(temp)  # mkstemp makes 0600: the cache is shared like any file of the user's
            os.replace(temp, target)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
