"""Sp-CFA superpixel views: SLIC labels, mosaic, inverse mosaic, label cache."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch

from texad.errors import TexadError
from texad.data import superpixels as sp
from texad.data.superpixels import (
    SuperpixelCache,
    build_mosaic,
    arrange_tiles,
    guard_corner,
    inverse_mosaic,
    mosaic_layout,
    slic_labels,
    tile_grid,
)


def smooth_image(height: int, width: int, channels: int | None = 3, seed: int = 0) -> np.ndarray:
    """Blurred noise stretched to 0..255: textured enough for SLIC, smooth enough to resize."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels is None else (height, width, channels)
    image = cv2.GaussianBlur((rng.random(shape) * 255).astype(np.float32), (0, 0), 4)
    image = (image - image.min()) / (image.max() - image.min()) * 255
    return image.astype(np.uint8)


def block_labels(row_edges: list[int], col_edges: list[int]) -> np.ndarray:
    """Rectangular superpixels of unequal sizes: each rectangle is exactly one superpixel."""
    rows = np.searchsorted(row_edges, np.arange(row_edges[-1]), side="right") - 1
    cols = np.searchsorted(col_edges, np.arange(col_edges[-1]), side="right") - 1
    return (rows[:, None] * (len(col_edges) - 1) + cols[None, :]).astype(np.int32)


def to_chw(image: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(image)).float()
    return tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor


def roundtrip(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mosaic of the image used as its own score map, mapped back to image coordinates."""
    mosaic = build_mosaic(image.astype(np.float32), labels)
    back = inverse_mosaic(to_chw(mosaic)[None], torch.from_numpy(labels)[None])[0]
    return (back.permute(1, 2, 0) if back.ndim == 3 else back).numpy()


# ---------------------------------------------------------------------------- tile geometry


@pytest.mark.parametrize(
    ("height", "width", "count"),
    [(256, 256, 676), (256, 256, 49), (200, 300, 62), (64, 512, 30), (7, 5, 35), (256, 256, 1)],
)
def test_tile_grid_fits_all_tiles_with_the_largest_side(height, width, count):
    side, columns = tile_grid(height, width, count)
    assert side >= 1 and columns == width // side
    assert (height // side) * (width // side) >= count
    bigger = side + 1
    assert bigger > min(height, width) or (height // bigger) * (width // bigger) < count


def test_tile_grid_rejects_more_superpixels_than_pixels():
    with pytest.raises(TexadError, match="36"):
        tile_grid(7, 5, 36)


# ---------------------------------------------------------------------------- SLIC


@pytest.mark.parametrize("channels", [3, None])
def test_slic_labels_are_contiguous_int32(channels):
    image = smooth_image(96, 128, channels)
    labels = slic_labels(image, 16)
    assert labels.shape == (96, 128) and labels.dtype == np.int32
    present = np.unique(labels)
    assert present[0] == 0 and np.array_equal(present, np.arange(len(present)))
    assert len(present) > 10


def test_smaller_region_size_gives_more_superpixels():
    image = smooth_image(128, 128)
    assert slic_labels(image, 10).max() > slic_labels(image, 35).max()


@pytest.mark.parametrize("region_size", [0, -4, 97])
def test_slic_rejects_bad_region_size_naming_it(region_size):
    with pytest.raises(TexadError, match=f"region_size={region_size}.*96x128"):
        slic_labels(smooth_image(96, 128), region_size)


@pytest.mark.parametrize(
    "image",
    [np.zeros((32, 32, 3), np.float32), np.zeros((32, 32, 4), np.uint8), np.zeros(32, np.uint8)],
)
def test_slic_rejects_wrong_image_shape_or_dtype(image):
    with pytest.raises(TexadError, match="SLIC expects"):
        slic_labels(image, 8)


# ---------------------------------------------------------------------------- mosaic


@pytest.mark.parametrize(("height", "width"), [(96, 96), (80, 144)])
def test_mosaic_has_one_tile_per_superpixel_and_zeros_elsewhere(height, width):
    labels = slic_labels(smooth_image(height, width), 12)
    layout = mosaic_layout(labels)
    ones = np.ones((height, width, 3), np.float32)
    mosaic = build_mosaic(ones, labels, fill="zeros")
    assert mosaic.shape == ones.shape and mosaic.dtype == np.float32

    side = layout.tile_side
    covered = np.zeros((height, width), bool)
    for ty, tx in layout.tiles:
        covered[ty : ty + side, tx : tx + side] = True
    assert np.allclose(mosaic[covered], 1.0)  # bicubic keeps a constant constant
    assert not mosaic[~covered].any()

    grid_cells = [
        mosaic[ty : ty + side, tx : tx + side]
        for ty in range(0, height - side + 1, side)
        for tx in range(0, width - side + 1, side)
    ]
    assert sum(cell.any() for cell in grid_cells) == labels.max() + 1 == layout.count


def _paper_layout_with_free_area():
    """Labels whose tile grid leaves free slots and right/bottom strips (checked below)."""
    labels = block_labels([0, 9, 30, 31, 50], [0, 5, 28, 44, 70])  # 16 superpixels, 50x70: side 12, 20 slots
    layout = mosaic_layout(labels)
    side, columns = layout.tile_side, layout.columns
    rows = 50 // side
    assert rows * columns > layout.count and (rows * side < 50 or columns * side < 70)
    return labels, layout, rows


@pytest.mark.parametrize("channels", [3, None])
def test_reflect_fill_copies_tiles_into_free_slots_and_mirrors_the_strips(channels):
    labels, layout, rows = _paper_layout_with_free_area()
    image = smooth_image(50, 70, channels) // 2 + 64  # no black pixel of its own
    zeros = build_mosaic(image, labels, fill="zeros")
    mosaic = build_mosaic(image, labels, fill="reflect")
    assert mosaic.shape == image.shape and mosaic.dtype == image.dtype
    side, columns, n = layout.tile_side, layout.columns, layout.count
    # the tiles themselves are the paper's, pixel for pixel
    for ty, tx in layout.tiles:
        np.testing.assert_array_equal(mosaic[ty : ty + side, tx : tx + side], zeros[ty : ty + side, tx : tx + side])
    # a free slot after the row's last real tile b holds tile b - d, d slots past it (mirrored in its row)
    real = np.zeros(rows * columns, bool)
    real[:n] = True
    real = real.reshape(rows, columns)
    for r in range(rows):
        cols = np.flatnonzero(real[r])
        assert cols.size  # every row of this layout has a tile
        last = cols[-1]
        for c in range(last + 1, columns):
            source = max(last - (c - last - 1), cols[0])
            np.testing.assert_array_equal(mosaic[r * side : (r + 1) * side, c * side : (c + 1) * side],
                                          mosaic[r * side : (r + 1) * side, source * side : (source + 1) * side])
    # strips mirror the grid: column grid_w + d is column grid_w - 1 - d (and likewise rows)
    grid_h, grid_w = rows * side, columns * side
    for d in range(70 - grid_w):
        np.testing.assert_array_equal(mosaic[:grid_h, grid_w + d], mosaic[:grid_h, grid_w - 1 - d])
    for d in range(50 - grid_h):
        np.testing.assert_array_equal(mosaic[grid_h + d], mosaic[grid_h - 1 - d])
    # nothing black is left where the paper's mosaic is black
    free = build_mosaic(np.ones(image.shape, np.float32), labels, fill="zeros") == 0
    assert free.any() and zeros[free].max() == 0 and mosaic[free].min() >= 64 - 8  # bicubic overshoot


def test_fill_does_not_change_what_the_inverse_reads():
    """Only pixels outside every tile differ, so the score map carried back is the same."""
    labels, _, _ = _paper_layout_with_free_area()
    image = smooth_image(50, 70).astype(np.float32)
    back = {
        fill: inverse_mosaic(to_chw(build_mosaic(image, labels, fill))[None], torch.from_numpy(labels)[None])
        for fill in ("zeros", "reflect")
    }
    torch.testing.assert_close(back["zeros"], back["reflect"], rtol=0, atol=0)


def test_mosaic_rejects_an_unknown_fill():
    labels, _, _ = _paper_layout_with_free_area()
    with pytest.raises(TexadError, match="mosaic_fill"):
        build_mosaic(smooth_image(50, 70), labels, fill="mirror")


@pytest.mark.parametrize(("height", "width", "region_size", "guard"), [(128, 128, 10, 32), (128, 128, 35, 32), (96, 160, 12, 20)])
def test_guard_corner_keeps_real_tiles_out_of_the_corner_and_the_inverse_exact(height, width, region_size, guard):
    labels = slic_labels(smooth_image(height, width), region_size)
    guarded = guard_corner(labels, guard)
    n = labels.max() + 1
    # a relabelling: one id per superpixel, same pixels
    assert len(np.unique(guarded)) == n
    assert np.array_equal(np.unique(guarded[labels == 0]), [guarded[labels == 0][0]])
    layout = mosaic_layout(guarded, free_slots=True)
    real = layout.rects[:, 2] > 0
    assert real.sum() == n and real[-1]  # the last id is real, so max id + 1 is the slot count
    assert layout.tile_side == tile_grid(height, width, layout.count)[0]
    starts_in_guard = (layout.tiles[:, 0] < guard) & (layout.tiles[:, 1] < guard)
    assert starts_in_guard.any() and not (starts_in_guard & real).any()
    # slot k filled with value k comes back as the guarded label map (exact geometry)
    slot_map = np.full((height, width), -1.0, np.float32)
    for index, (ty, tx) in enumerate(layout.tiles):
        slot_map[ty : ty + layout.tile_side, tx : tx + layout.tile_side] = index
    back = inverse_mosaic(torch.from_numpy(slot_map)[None], torch.from_numpy(guarded)[None])[0]
    torch.testing.assert_close(back, torch.from_numpy(guarded).float(), rtol=0, atol=1e-3)
    # the mosaic's guard square holds copies of real tiles, not black, with fill="reflect"
    image = smooth_image(height, width) // 2 + 64
    mosaic = build_mosaic(image, guarded, fill="reflect")
    assert mosaic[:guard, :guard].min() >= 64 - 8
    assert build_mosaic(image, guarded, fill="zeros")[: layout.tile_side, : layout.tile_side].max() == 0


def test_guard_zero_or_too_few_superpixels_keeps_the_papers_layout():
    labels = slic_labels(smooth_image(96, 96), 12)
    assert guard_corner(labels, 0) is labels
    one = np.zeros((64, 64), np.int32)  # one superpixel cannot leave the corner slot's row
    assert np.array_equal(guard_corner(one, 32), one)
    two = np.zeros((64, 64), np.int32)
    two[:, 32:] = 1  # two superpixels: 2x2 slots of 32, slot 0 free, ids 1 and 2
    assert np.array_equal(guard_corner(two, 32), two + 1)
    with pytest.raises(TexadError, match="contiguous"):
        mosaic_layout(guard_corner(labels, 24))  # free ids need free_slots=True


def test_mosaic_keeps_dtype_and_grayscale_shape():
    image = smooth_image(64, 80, None)
    labels = slic_labels(image, 10)
    mosaic = build_mosaic(image, labels)
    assert mosaic.shape == image.shape and mosaic.dtype == np.uint8
    assert build_mosaic(image.astype(np.float32), labels).dtype == np.float32


def test_layout_rects_bound_each_superpixel_tightly():
    labels = slic_labels(smooth_image(72, 100), 12)
    layout = mosaic_layout(labels)
    for index, (y0, x0, h, w) in enumerate(layout.rects):
        ys, xs = np.nonzero(labels == index)
        assert (y0, x0, h, w) == (ys.min(), xs.min(), np.ptp(ys) + 1, np.ptp(xs) + 1)


def test_layout_rejects_labels_with_gaps():
    with pytest.raises(TexadError, match="contiguous"):
        mosaic_layout(np.array([[0, 2], [2, 0]]))


# ---------------------------------------------------------------------------- inverse


@pytest.mark.parametrize("channels", [3, None])
@pytest.mark.parametrize(("height", "width"), [(60, 60), (48, 90)])
def test_roundtrip_is_exact_on_piecewise_constant_superpixels(channels, height, width):
    """When each rectangle is one constant superpixel, resize and back lose nothing."""
    row_edges = [0, 7, 20, 21, 40, height]
    col_edges = [0, 3, 30, 31, 55, width]
    labels = block_labels(row_edges, col_edges)
    rng = np.random.default_rng(1)
    values = rng.uniform(1, 255, size=(labels.max() + 1, 3 if channels else 1)).astype(np.float32)
    image = values[labels] if channels else values[labels, 0]
    # Exact up to float rounding in cv2's bicubic weights.
    np.testing.assert_allclose(roundtrip(image, labels), image, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("channels", [3, None])
@pytest.mark.parametrize(
    ("height", "width", "region_size"), [(128, 128, 10), (128, 128, 35), (96, 160, 16)]
)
def test_roundtrip_recovers_a_smooth_image_inside_every_superpixel(
    channels, height, width, region_size
):
    image = smooth_image(height, width, channels)
    labels = slic_labels(image, region_size)
    error = np.abs(roundtrip(image, labels) - image.astype(np.float32))
    assert error.mean() < 0.01 * 255
    per_superpixel = np.bincount(labels.ravel(), weights=error.reshape(labels.size, -1).mean(1))
    per_superpixel /= np.bincount(labels.ravel())
    assert per_superpixel.max() < 0.05 * 255  # no superpixel reads the wrong tile


@pytest.mark.parametrize(("height", "width"), [(64, 64), (50, 120)])
def test_inverse_sends_every_pixel_to_its_own_tile(height, width):
    """Tile i filled with value i comes back as the label map: numpy and torch agree on geometry."""
    labels = slic_labels(smooth_image(height, width), 9)
    layout = mosaic_layout(labels)
    slot_map = np.full((height, width), -1.0, np.float32)
    for index, (ty, tx) in enumerate(layout.tiles):
        slot_map[ty : ty + layout.tile_side, tx : tx + layout.tile_side] = index
    back = inverse_mosaic(torch.from_numpy(slot_map)[None], torch.from_numpy(labels)[None])[0]
    # Up to float32 rounding of the sampling coordinates (a ~1e-6 share of a neighbouring tile).
    torch.testing.assert_close(back, torch.from_numpy(labels).float(), rtol=0, atol=1e-3)


def test_inverse_matches_resize_keep_and_paste():
    """The vectorised inverse equals the paper's loop: resize tile to rect, keep, paste."""
    height, width = 72, 104
    labels = slic_labels(smooth_image(height, width), 12)
    layout = mosaic_layout(labels)
    score = np.random.default_rng(2).random((height, width)).astype(np.float32)
    expected = np.zeros_like(score)
    side = layout.tile_side
    for index, ((y0, x0, h, w), (ty, tx)) in enumerate(zip(layout.rects, layout.tiles)):
        tile = score[ty : ty + side, tx : tx + side]
        patch = cv2.resize(tile, (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
        keep = labels[y0 : y0 + h, x0 : x0 + w] == index
        expected[y0 : y0 + h, x0 : x0 + w][keep] = patch[keep]
    result = inverse_mosaic(torch.from_numpy(score)[None], torch.from_numpy(labels)[None])[0]
    result = result.numpy()
    np.testing.assert_allclose(result, expected, atol=1e-4)


def test_inverse_batched_equals_per_image_and_handles_channels():
    height, width = 64, 80
    images = [smooth_image(height, width, seed=seed) for seed in range(3)]
    labels = torch.stack(
        [torch.from_numpy(slic_labels(image, size)) for image, size in zip(images, (8, 14, 30))]
    )
    assert len({int(l.max()) for l in labels}) == 3  # different superpixel counts per image
    maps = torch.rand(3, 2, height, width)

    batched = inverse_mosaic(maps, labels)
    assert batched.shape == maps.shape
    for index in range(3):
        single = inverse_mosaic(maps[index : index + 1], labels[index : index + 1])
        torch.testing.assert_close(batched[index : index + 1], single)
    torch.testing.assert_close(inverse_mosaic(maps[:, 0], labels.int()), batched[:, 0])


def test_inverse_rejects_mismatched_labels():
    with pytest.raises(TexadError, match="labels shape"):
        inverse_mosaic(torch.zeros(2, 16, 16), torch.zeros(2, 16, 17, dtype=torch.int64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_inverse_on_gpu_matches_cpu():
    labels = torch.from_numpy(slic_labels(smooth_image(64, 64), 10))[None].repeat(2, 1, 1)
    maps = torch.rand(2, 64, 64)
    on_gpu = inverse_mosaic(maps.cuda(), labels.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), inverse_mosaic(maps, labels))


# ---------------------------------------------------------------------------- cache


@pytest.fixture
def counted_slic(monkeypatch):
    calls = []
    real = sp.slic_labels

    def counting(image, region_size, **kwargs):
        calls.append(region_size)
        return real(image, region_size, **kwargs)

    monkeypatch.setattr(sp, "slic_labels", counting)
    return calls


def test_cache_computes_once_and_returns_identical_labels(tmp_path, counted_slic):
    image_path = tmp_path / "image.png"
    image = smooth_image(64, 64)
    cv2.imwrite(str(image_path), image)
    cache = SuperpixelCache(tmp_path / "cache")

    first = cache.labels_for(str(image_path), image, 12)
    second = cache.labels_for(str(image_path), image, 12)
    assert counted_slic == [12]
    assert np.array_equal(first, second) and second.dtype == np.int32
    assert np.array_equal(first, slic_labels(image, 12))

    cache.labels_for(str(image_path), image, 20)
    cache.labels_for(str(image_path), image, 12, ruler=20.0)
    assert counted_slic == [12, 20, 12]
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    # One file per key and no temp files left behind.
    assert len(entries) == 3 and all(name.endswith(".npz") for name in entries)


def test_cache_misses_when_the_file_or_the_image_changes(tmp_path, counted_slic):
    image_path = tmp_path / "image.png"
    image = smooth_image(48, 48)
    cv2.imwrite(str(image_path), image)
    cache = SuperpixelCache(tmp_path / "cache")
    cache.labels_for(str(image_path), image, 10)

    cache.labels_for(str(image_path), image[:, :40].copy(), 10)  # e.g. a different crop
    cv2.imwrite(str(image_path), image[::-1].copy())
    stat = image_path.stat()
    os.utime(image_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    cache.labels_for(str(image_path), image, 10)
    assert counted_slic == [10, 10, 10]


def test_cache_recovers_from_a_corrupt_entry(tmp_path, counted_slic):
    image = smooth_image(48, 48)
    cache = SuperpixelCache(tmp_path)
    key = cache.key("virtual.png", image, 10)
    cache.path_for(key).write_bytes(b"not an npz")
    labels = cache.labels_for("virtual.png", image, 10)
    assert counted_slic == [10] and labels.shape == (48, 48)
    assert np.array_equal(cache.labels_for("virtual.png", image, 10), labels)
    assert counted_slic == [10]


def test_inverse_keeps_the_map_dtype():
    labels = torch.from_numpy(slic_labels(smooth_image(32, 48), 8))[None]
    maps = torch.rand(1, 32, 48, dtype=torch.float64)
    reference = inverse_mosaic(maps, labels)
    assert reference.dtype == torch.float64
    half = inverse_mosaic(maps.to(torch.bfloat16), labels)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), reference, atol=2e-2, rtol=0)


def test_cache_concurrent_writers_leave_one_complete_entry(tmp_path):
    """DataLoader workers may race on one key: every reader gets full labels, no temp files stay."""
    from concurrent.futures import ThreadPoolExecutor

    image = smooth_image(64, 64)
    caches = [SuperpixelCache(tmp_path) for _ in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        jobs = [pool.submit(cache.labels_for, "shared.png", image, 10) for cache in caches * 3]
        results = [job.result() for job in jobs]
    assert all(np.array_equal(result, results[0]) for result in results)
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]


# ---------------------------------------------------------------------------- tile order


def _texture(name: str, size: int) -> np.ndarray:
    """A crop of a scikit-image texture (the embedded sets' sources), resized to size²."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    crop = image[: min(image.shape[:2]), : min(image.shape[:2])]
    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA)


def _adjacent_source_distances(arranged: np.ndarray) -> tuple[float, float]:
    """Median distance between the source-superpixel centroids of mosaic-adjacent tiles (across, down)."""
    layout = mosaic_layout(arranged, free_slots=True)
    flat = arranged.ravel()
    sizes = np.bincount(flat, minlength=layout.count)
    ys, xs = np.divmod(np.arange(flat.size), arranged.shape[1])
    cy = np.bincount(flat, ys, layout.count) / np.maximum(sizes, 1)
    cx = np.bincount(flat, xs, layout.count) / np.maximum(sizes, 1)
    rows = layout.height // layout.tile_side
    slots = np.full(rows * layout.columns, -1)
    slots[: layout.count][sizes > 0] = np.flatnonzero(sizes > 0)
    slots = slots.reshape(rows, layout.columns)
    out = []
    for a, b in ((slots[:, :-1], slots[:, 1:]), (slots[:-1], slots[1:])):
        both = (a >= 0) & (b >= 0)
        a, b = a[both], b[both]  # pairs of tiles next to each other, both real
        out.append(float(np.median(np.hypot(cy[a] - cy[b], cx[a] - cx[b]))))
    return out[0], out[1]


@pytest.mark.parametrize("size", [128, 256])
@pytest.mark.parametrize("texture", ["brick", "gravel"])
@pytest.mark.parametrize("min_element_size", [25, None])
@pytest.mark.parametrize("guard", [0, 32])
def test_arranged_mosaic_keeps_neighbours_together(size, texture, min_element_size, guard):
    """Tiles next to each other in the mosaic come from superpixels next to each other in the image."""
    region_size = 10
    labels = slic_labels(_texture(texture, size), region_size, min_element_size=min_element_size)
    across, down = _adjacent_source_distances(arrange_tiles(labels, guard))
    assert across <= 1.5 * region_size and down <= 1.5 * region_size
    if min_element_size is not None:  # SLIC's own numbering (connectivity step on) shuffles the tiles
        across, down = _adjacent_source_distances(guard_corner(labels, guard))
        assert max(across, down) > 2.5 * region_size


@pytest.mark.parametrize(("height", "width", "region_size", "guard"),
                         [(128, 128, 10, 32), (128, 128, 35, 32), (96, 160, 12, 20), (256, 256, 10, 0)])
def test_arranged_labels_are_slots_and_the_inverse_stays_exact(height, width, region_size, guard):
    labels = slic_labels(smooth_image(height, width), region_size)
    arranged = arrange_tiles(labels, guard)
    n = labels.max() + 1
    assert len(np.unique(arranged)) == n  # a relabelling: one id per superpixel ...
    pairs = np.unique(np.stack([labels.ravel(), arranged.ravel()]), axis=1)
    assert pairs.shape[1] == n  # ... mapping whole superpixels
    layout = mosaic_layout(arranged, free_slots=True)
    assert layout.tile_side == tile_grid(height, width, layout.count)[0]
    real = layout.rects[:, 2] > 0
    if guard:
        in_guard = (layout.tiles[:, 0] < guard) & (layout.tiles[:, 1] < guard)
        assert in_guard.any() and not (in_guard & real).any()
    # an identity "score map" (slot k holds k) comes back as the arranged label map
    slot_map = np.full((height, width), -1.0, np.float32)
    for index, (ty, tx) in enumerate(layout.tiles):
        slot_map[ty : ty + layout.tile_side, tx : tx + layout.tile_side] = index
    back = inverse_mosaic(torch.from_numpy(slot_map)[None], torch.from_numpy(arranged)[None])[0]
    torch.testing.assert_close(back, torch.from_numpy(arranged).float(), rtol=0, atol=1e-3)
    # and a smooth image comes back inside every superpixel (as for SLIC's own order)
    image = smooth_image(height, width, None)
    error = np.abs(roundtrip(image, arranged) - image.astype(np.float32))
    assert error.mean() < 0.01 * 255
    per_superpixel = np.bincount(arranged.ravel(), weights=error.ravel()) / np.maximum(np.bincount(arranged.ravel()), 1)
    assert per_superpixel.max() < 0.05 * 255  # no superpixel reads the wrong tile


def test_arrange_tiles_rejects_labels_with_gaps():
    labels = np.zeros((20, 20), np.int32)
    labels[:, 10:] = 2
    with pytest.raises(TexadError, match="contiguous"):
        arrange_tiles(labels)
