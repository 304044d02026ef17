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
