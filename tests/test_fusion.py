"""α re-fusion: the simplex grid, a search with a known answer, and blur-then-fuse = fuse-then-blur."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from texad.errors import TexadError
from texad.methods.cfa.fusion import blur_views, fused_metrics, grid_search, simplex_grid, time_refusion
from texad.metrics.functional import average_precision
from texad.methods.components.gaussian import gaussian_blur2d


def test_simplex_grid_covers_the_simplex():
    grid = simplex_grid(3, 0.05)
    assert grid.shape == (231, 3)  # C(20 + 2, 2)
    assert np.allclose(grid.sum(1), 1.0) and (grid >= 0).all()
    assert len({tuple(np.round(g, 6)) for g in grid}) == 231
    assert simplex_grid(2, 0.1).shape == (11, 2)
    assert simplex_grid(1, 0.05).tolist() == [[1.0]]
    with pytest.raises(TexadError):
        simplex_grid(3, 0.3)


def _views_with_known_best(n=12, size=48, seed=0):
    """org and small see the defect through independent noise, big sees only noise.

    Averaging two independent noisy views beats either alone, so the best α is about
    (0.5, 0.5, 0) and never puts weight on big.
    """
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[n // 2 :, 16:32, 16:32] = True
    maps = {
        "org": torch.randn(n, size, size, generator=g) + 0.6 * masks,
        "small": torch.randn(n, size, size, generator=g) + 0.6 * masks,
        "big": torch.randn(n, size, size, generator=g),
    }
    return maps, masks, masks.flatten(1).any(1).long()


@pytest.mark.parametrize("screen_stride", [1, 2])
def test_grid_search_finds_the_known_best_alpha(screen_stride):
    maps, masks, labels = _views_with_known_best()
    blurred = blur_views(maps, sigma=1.0)
    result = grid_search(blurred, masks, labels, "pixel_aupr", step=0.1, screen_stride=screen_stride)
    assert result.n_points == 66
    assert result.alpha["big"] <= 0.1
    assert abs(result.alpha["org"] - result.alpha["small"]) <= 0.2
    # the reported value is the exact metric of the fused map at that α
    fused = sum(result.alpha[v] * blurred[v] for v in blurred)
    assert result.value == pytest.approx(average_precision(fused, masks), abs=1e-9)
    # and it beats every single view
    for v in blurred:
        assert result.value > average_precision(blurred[v], masks)


def test_blurring_views_first_equals_blurring_the_fused_map():
    maps, masks, labels = _views_with_known_best(n=6, size=40)
    alpha = {"org": 0.2, "small": 0.5, "big": 0.3}
    fused_then_blurred = gaussian_blur2d(sum(alpha[v] * m for v, m in maps.items()), 4.0)
    from_views = fused_metrics(blur_views(maps, 4.0), masks, labels, alpha)
    assert from_views["pixel_aupr"] == pytest.approx(average_precision(fused_then_blurred, masks), abs=1e-6)
    assert set(from_views) >= {"pixel_auroc", "pixel_aupro", "pixel_aupr", "pixel_f1", "image_auroc", "image_f1"}


def test_search_without_anomalous_pixels_is_a_clear_error():
    maps, masks, labels = _views_with_known_best(n=4, size=32)
    with pytest.raises(TexadError, match="anomalous pixels"):
        grid_search(blur_views(maps, 1.0), torch.zeros_like(masks), labels, "pixel_aupr", step=0.5)


def test_time_refusion_reports_the_benchmark_figure():
    timing = time_refusion(n_points=4, n_images=4, size=64)
    assert timing["n_points"] == 4 and timing["pixels"] == 4 * 64 * 64
    assert timing["points_s"] > 0 and timing["per_point_s"] == pytest.approx(timing["points_s"] / 4)


def test_image_metrics_use_the_methods_image_score():
    """The re-fused image metrics follow method.image_score (top_mean), checked against scikit-learn."""
    from sklearn.metrics import roc_auc_score

    maps, masks, labels = _views_with_known_best(n=10, size=32)
    blurred = blur_views(maps, 1.0)
    alpha = {"org": 0.5, "small": 0.5, "big": 0.0}
    fused = 0.5 * blurred["org"] + 0.5 * blurred["small"]
    k = round(0.05 * 32 * 32)
    top_mean = np.sort(fused.reshape(10, -1), axis=1)[:, -k:].mean(1)
    got = fused_metrics(blurred, masks, labels, alpha, image_rule=("top_mean", 0.05))
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels.numpy(), top_mean), abs=1e-9)
    as_max = fused_metrics(blurred, masks, labels, alpha)
    assert as_max["image_auroc"] == pytest.approx(roc_auc_score(labels.numpy(), fused.reshape(10, -1).max(1)), abs=1e-9)
    # the grid search's image objective agrees with fused_metrics at the same α
    result = grid_search(blurred, masks, labels, "image_auroc", step=0.5, image_rule=("top_mean", 0.05))
    best = fused_metrics(blurred, masks, labels, result.alpha, image_rule=("top_mean", 0.05))
    assert result.value == pytest.approx(best["image_auroc"], abs=1e-9)


def test_refused_test_metrics_keep_f1_at_the_validation_threshold_ring_and_aupimo():
    """After re-fusion the test record has what a plain test pass has: F1 at validation's thresholds
    (checked by brute force), the normal images' ring ratio and AUPIMO."""
    from texad.methods.cfa.fusion import refuse
    from texad.metrics.aupimo import pixel_aupimo
    from texad.metrics.border import ring_ratio

    def split(seed):
        maps, masks, labels = _views_with_known_best(n=8, size=160, seed=seed)  # AUPIMO needs 1e5 normal pixels
        return {"maps": maps, "masks": masks, "labels": labels}

    outputs = {"val": split(0), "test": split(1)}
    result, val, test = refuse(outputs, blur_sigma=1.0, step=0.5)
    fused = sum(result.alpha[v] * x for v, x in blur_views(outputs["test"]["maps"], 1.0).items())
    masks, labels = outputs["test"]["masks"].numpy(), outputs["test"]["labels"].numpy()
    t = val["pixel_f1_threshold"]
    pred, truth = fused >= t, masks
    tp = float((pred & truth).sum())
    assert test["pixel_f1_at_val"] == pytest.approx(2 * tp / (pred.sum() + truth.sum()), abs=1e-9)
    scores = fused.reshape(8, -1).max(1)
    pred_img = scores >= val["image_f1_threshold"]
    tp_img = float((pred_img & (labels == 1)).sum())
    assert test["image_f1_at_val"] == pytest.approx(2 * tp_img / (pred_img.sum() + (labels == 1).sum()), abs=1e-9)
    assert test["ring_ratio"] == pytest.approx(ring_ratio(torch.from_numpy(fused[labels == 0])), abs=1e-9)
    assert test["pixel_aupimo"] is not None
    assert test["pixel_aupimo"] == pytest.approx(pixel_aupimo(fused, masks), abs=1e-9)


# ---------------------------------------------------------------------------- blur order


def _brute_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian of radius round(4σ), mirror padding without edge repeat, as a plain double loop."""
    radius = max(1, int(4 * sigma + 0.5))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    h, w = x.shape

    def mirror(i: int, n: int) -> int:
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    rows = np.zeros_like(x, dtype=np.float64)
    for y in range(h):
        for xx in range(w):
            rows[y, xx] = sum(t * x[mirror(y + k, h), xx] for k, t in zip(range(-radius, radius + 1), taps))
    out = np.zeros_like(rows)
    for y in range(h):
        for xx in range(w):
            out[y, xx] = sum(t * rows[y, mirror(xx + k, w)] for k, t in zip(range(-radius, radius + 1), taps))
    return out


def _brute_inverse(mosaic_map: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each pixel of superpixel i reads tile i (slot i of the grid of the largest fitting side) where the
    bicubic forward resize put it (half-pixel convention, clamped to the tile), by bilinear interpolation."""
    h, w = labels.shape
    n = int(labels.max()) + 1
    side = max(s for s in range(1, min(h, w) + 1) if (h // s) * (w // s) >= n)
    columns = w // side
    out = np.zeros((h, w))
    for i in range(n):
        ys, xs = np.nonzero(labels == i)
        if ys.size == 0:
            continue
        y0, x0, rh, rw = ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        ty, tx = (i // columns) * side, (i % columns) * side
        for y, x in zip(ys, xs):
            u = min(max((y - y0 + 0.5) * side / rh - 0.5, 0.0), side - 1) + ty
            v = min(max((x - x0 + 0.5) * side / rw - 0.5, 0.0), side - 1) + tx
            a, b = int(np.floor(u)), int(np.floor(v))
            fu, fv = u - a, v - b
            a1, b1 = min(a + 1, h - 1), min(b + 1, w - 1)
            out[y, x] = ((1 - fu) * (1 - fv) * mosaic_map[a, b] + (1 - fu) * fv * mosaic_map[a, b1]
                         + fu * (1 - fv) * mosaic_map[a1, b] + fu * fv * mosaic_map[a1, b1])
    return out


def test_both_blur_orders_match_a_brute_force_reference_on_a_tiny_mosaic():
    """"after": blur(Σ α S_v); "mosaic": α_org blur(S_org) + α_s inverse(blur(M_s)), M_s in mosaic coordinates."""
    from texad.data.superpixels import arrange_tiles
    from texad.methods.cfa.fusion import fuse_blurred, mosaic_blurred, order_blurred

    rng = np.random.default_rng(0)
    h = w = 16
    labels = np.zeros((h, w), np.int64)  # 7 irregular superpixels
    yy, xx = np.mgrid[:h, :w]
    centres = rng.uniform(0, 16, (7, 2))
    labels = np.argmin((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2, axis=-1)
    labels = np.unique(labels, return_inverse=True)[1].reshape(h, w)
    labels = arrange_tiles(labels, guard=5)  # slot ids with a free corner slot: the general case
    sigma = 1.0
    org = rng.random((h, w))
    mosaic = rng.random((h, w))  # the small view's map on its mosaic
    lab_t = torch.from_numpy(labels)[None]
    small = mosaic_inverse = torch.from_numpy(_brute_inverse(mosaic, labels)).float()[None]
    from texad.data.superpixels import inverse_mosaic

    torch.testing.assert_close(inverse_mosaic(torch.from_numpy(mosaic).float()[None], lab_t), mosaic_inverse,
                               rtol=0, atol=1e-5)
    split = {"maps": {"org": torch.from_numpy(org).float()[None], "small": small},
             "mosaic_blurred": {"small": mosaic_blurred(torch.from_numpy(mosaic).float()[None], lab_t, sigma)}}
    alpha = {"org": 0.3, "small": 0.7}
    after = fuse_blurred(order_blurred(split, sigma, "after"), alpha)[0].numpy()
    expected_after = _brute_blur(0.3 * org + 0.7 * _brute_inverse(mosaic, labels), sigma)
    np.testing.assert_allclose(after, expected_after, atol=1e-5)
    paper = fuse_blurred(order_blurred(split, sigma, "mosaic"), alpha)[0].numpy()
    expected_paper = 0.3 * _brute_blur(org, sigma) + 0.7 * _brute_inverse(_brute_blur(mosaic, sigma), labels)
    np.testing.assert_allclose(paper, expected_paper, atol=1e-5)
    assert np.abs(paper - after).max() > 1e-2  # the orders differ: blur and inverse do not commute
    with pytest.raises(TexadError, match="blur order"):
        order_blurred(split, sigma, "before")
    with pytest.raises(TexadError, match="mosaic-blurred"):
        order_blurred({"maps": split["maps"]}, sigma, "mosaic")


def test_refuse_chooses_the_blur_order_on_validation():
    """Each order gets its own α grid; the better validation value picks the order (test never read)."""
    from texad.methods.cfa.fusion import refuse

    g = torch.Generator().manual_seed(0)
    n, size = 6, 24
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[3:, 8:14, 8:14] = True

    def split(paper_better: bool) -> dict:
        noise = torch.rand(n, size, size, generator=g)
        signal = masks.float()
        # "mosaic" maps carry the defect, "after" maps only noise (or the other way round)
        good, bad = signal + 0.3 * noise, torch.rand(n, size, size, generator=g)
        maps = {"org": torch.rand(n, size, size, generator=g), "small": good if not paper_better else bad}
        return {"maps": maps, "mosaic_blurred": {"small": bad if not paper_better else good}, "masks": masks,
                "labels": torch.tensor([0, 0, 0, 1, 1, 1]), "paths": [f"{i}.png" for i in range(n)],
                "types": ["good"] * 3 + ["hole"] * 3}

    for paper_better, chosen in ((True, "mosaic"), (False, "after")):
        outputs = {"val": split(paper_better), "test": split(not paper_better)}  # test says the opposite
        result, val, _ = refuse(outputs, blur_sigma=1.0, step=0.25, blur_orders=["after", "mosaic"])
        assert result.blur_order == chosen and set(result.by_order) == {"after", "mosaic"}
        assert result.alpha["small"] > 0.5
        assert result.by_order[chosen]["val_metric"] == pytest.approx(result.value)


def test_view_records_are_each_view_alone_with_intervals():
    from texad.methods.cfa.fusion import VIEW_METRICS, order_blurred, view_records

    g = torch.Generator().manual_seed(1)
    n, size = 8, 20
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[4:, 5:11, 6:12] = True
    maps = {"org": torch.rand(n, size, size, generator=g) + masks.float(), "small": torch.rand(n, size, size, generator=g)}
    split = {"maps": maps, "mosaic_blurred": {"small": gaussian_blur2d(maps["small"], 1.0)}, "masks": masks,
             "labels": torch.tensor([0] * 4 + [1] * 4), "paths": [f"{i}.png" for i in range(n)], "types": ["good"] * 4 + ["x"] * 4}
    for order in ("after", "mosaic"):
        records = view_records(split, 1.0, order)
        blurred = order_blurred(split, 1.0, order)
        for v in ("org", "small"):
            alone = fused_metrics(blurred, masks, split["labels"], {v: 1.0})
            assert {k: records[v][k] for k in VIEW_METRICS} == {k: alone[k] for k in VIEW_METRICS}
            for k in ("pixel_auroc", "pixel_aupr", "pixel_f1", "pixel_aupro"):
                low, high = records[v]["ci95"][k]
                assert low <= high
        assert records["org"]["pixel_auroc"] > 0.9 > records["small"]["pixel_auroc"]
