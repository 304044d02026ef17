"""Exactness of the pixel/image anomaly metrics against scikit-learn and brute force."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from texad.errors import TexadError
from texad.metrics import (
    ImageMetrics,
    PixelMetrics,
    aupro,
    average_precision,
    best_f1,
    label_regions,
    pixel_scores,
    pro_curve,
    roc_auc,
)


def sklearn_best_f1(scores, targets) -> float:
    precision, recall, _ = precision_recall_curve(targets, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return float(f1.max())


def tied_scores(rng, n, dtype, decimals=1):
    """Rounded normal scores: many ties inside and across classes."""
    return np.round(rng.normal(size=n), decimals).astype(dtype)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ranking_metrics_match_sklearn_with_ties(seed, dtype):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 3000))
    targets = rng.random(n) < rng.uniform(0.05, 0.6)
    targets[:2] = [True, False]
    scores = tied_scores(rng, n, dtype, decimals=int(rng.integers(0, 3))) + targets * rng.uniform(0, 1)
    scores = scores.astype(dtype)

    assert roc_auc(scores, targets) == pytest.approx(roc_auc_score(targets, scores), abs=1e-6)
    assert average_precision(scores, targets) == pytest.approx(average_precision_score(targets, scores), abs=1e-6)
    f1, threshold = best_f1(torch.from_numpy(scores), torch.from_numpy(targets))
    assert f1 == pytest.approx(sklearn_best_f1(scores, targets), abs=1e-6)
    predicted = scores >= threshold  # the returned threshold reproduces the returned F1
    tp = np.sum(predicted & targets)
    assert 2 * tp / (predicted.sum() + targets.sum()) == pytest.approx(f1, abs=1e-12)


def test_continuous_scores_match_sklearn():
    rng = np.random.default_rng(7)
    targets = rng.random(5000) < 0.1
    scores = rng.normal(size=5000) + 1.5 * targets
    assert roc_auc(scores, targets) == pytest.approx(roc_auc_score(targets, scores), abs=1e-9)
    assert average_precision(scores, targets) == pytest.approx(average_precision_score(targets, scores), abs=1e-9)


def test_constant_scores_match_sklearn():
    targets = np.array([0, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    scores = np.full(targets.size, 3.0)
    assert roc_auc(scores, targets) == 0.5
    assert average_precision(scores, targets) == pytest.approx(average_precision_score(targets, scores))
    assert average_precision(scores, targets) == pytest.approx(targets.mean())
    f1, threshold = best_f1(scores, targets)
    assert f1 == pytest.approx(2 * 0.25 / 1.25) and threshold == 3.0


def test_one_class_missing_is_nan_or_defined():
    scores = np.array([0.1, 0.5, 0.3])
    no_pos = np.zeros(3, dtype=bool)
    assert math.isnan(roc_auc(scores, no_pos))
    assert math.isnan(average_precision(scores, no_pos))
    assert all(math.isnan(v) for v in best_f1(scores, no_pos))
    no_neg = np.ones(3, dtype=bool)
    assert math.isnan(roc_auc(scores, no_neg))
    assert average_precision(scores, no_neg) == 1.0
    assert best_f1(scores, no_neg) == (1.0, 0.1)


def test_nan_scores_are_rejected():
    with pytest.raises(TexadError):
        roc_auc(np.array([0.1, np.nan]), np.array([0, 1]))


# ----------------------------------------------------------------------------- AUPRO


def brute_force_regions(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components by breadth-first search, as lists of (row, col) pixels."""
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    inside = 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1]
                    if inside and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        queue.append((rr, cc))
        regions.append(np.array(pixels))
    return regions


def brute_force_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Evaluate FPR and every region's overlap at every distinct threshold; trapezoid to the limit."""
    region_scores = [maps[i][tuple(region.T)] for i in range(len(maps)) for region in brute_force_regions(masks[i])]
    normal_scores = maps[~masks]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(np.mean(normal_scores >= t))
        ys.append(np.mean([np.mean(s >= t) for s in region_scores]))
    area = 0.0
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def random_maps_with_regions(seed: int, n=6, size=14):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        if i % 3 == 2:
            continue  # all-normal images
        for _ in range(int(rng.integers(2, 5))):  # several regions, some touching diagonally
            r, c = rng.integers(0, size - 2, 2)
            h, w = rng.integers(1, 4, 2)
            masks[i, r : r + h, c : c + w] = True
    maps = np.round(rng.normal(size=masks.shape) + 0.8 * masks, 1).astype(np.float32)
    return maps, masks


def independent_pixel_scores(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> dict[str, float]:
    """The pixel metrics computed without texad: scikit-learn and the brute-force AUPRO above."""
    flat_maps, flat_masks = np.asarray(maps, np.float64).ravel(), np.asarray(masks, bool).ravel()
    return {
        "auroc": roc_auc_score(flat_masks, flat_maps),
        "ap": average_precision_score(flat_masks, flat_maps),
        "f1": sklearn_best_f1(flat_maps, flat_masks),
        "aupro": brute_force_aupro(np.asarray(maps, np.float64), np.asarray(masks, bool), fpr_limit),
    }


def assert_pixel_scores_match(got: dict[str, float], maps, masks, fpr_limit: float = 0.3) -> None:
    """`got` (texad's pixel_scores keys) equals the independent figures; its F1 threshold reproduces its F1."""
    want = independent_pixel_scores(maps, masks, fpr_limit)
    for key in ("auroc", "ap", "f1"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert got["aupro"] == pytest.approx(want["aupro"], abs=1e-4)
    predicted, truth = np.asarray(maps).ravel() >= got["f1_threshold"], np.asarray(masks, bool).ravel()
    assert 2 * np.sum(predicted & truth) / (predicted.sum() + truth.sum()) == pytest.approx(got["f1"], abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed, fpr_limit):
    maps, masks = random_maps_with_regions(seed)
    assert len([r for m in masks for r in brute_force_regions(m)]) >= 4
    expected = brute_force_aupro(maps, masks, fpr_limit)
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks), fpr_limit) == pytest.approx(expected, abs=1e-4)
    assert_pixel_scores_match(pixel_scores(maps, masks, fpr_limit), maps, masks, fpr_limit)


def test_aupro_hand_computable_cases():
    maps, masks = random_maps_with_regions(0)
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)  # perfect detector
    assert aupro(-masks.astype(np.float32), masks) == pytest.approx(0.0)  # inverted detector
    # Constant scores: one diagonal from (0, 0) to (1, 1); area to 0.3 is 0.3^2 / 2.
    assert aupro(np.zeros_like(maps), masks, 0.3) == pytest.approx(0.15)


def test_pro_curve_ends_at_the_limit():
    maps, masks = random_maps_with_regions(1)
    fpr, pro = pro_curve(maps, masks, 0.3)
    assert fpr[0] == 0.0 and pro[0] == 0.0 and fpr[-1] == pytest.approx(0.3)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    full_fpr, full_pro = pro_curve(maps, masks)
    assert full_fpr[-1] == 1.0 and full_pro[-1] == pytest.approx(1.0)


def test_regions_are_eight_connected_and_do_not_cross_images():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    masks[0, 3, 3] = True  # last row of image 0 ...
    masks[1, 0, 3] = True  # ... above first row of image 1: different images, different regions
    labels, n_regions = label_regions(masks)
    assert n_regions == 3
    assert labels[0, 0, 0] == labels[0, 1, 1] != labels[0, 3, 3] != labels[1, 0, 3]
    assert labels[~masks].max() == 0


def test_pixel_edge_cases():
    maps = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)
    no_anomaly = pixel_scores(maps, np.zeros(maps.shape, dtype=bool))
    assert all(math.isnan(no_anomaly[k]) for k in ("auroc", "aupro", "ap", "f1", "f1_threshold"))
    all_anomalous = pixel_scores(maps, np.ones(maps.shape, dtype=bool))
    assert math.isnan(all_anomalous["auroc"]) and math.isnan(all_anomalous["aupro"])
    assert all_anomalous["ap"] == 1.0 and all_anomalous["f1"] == 1.0


def test_unbounded_scores_equal_min_max_scaled_scores():
    """No sigmoid anywhere: metrics depend on the ranking only."""
    maps, masks = random_maps_with_regions(3)
    unbounded = maps.astype(np.float64) * 1e3 - 400.0  # values around -2000 .. 2000
    scaled = (unbounded - unbounded.min()) / (unbounded.max() - unbounded.min())
    raw, ref = pixel_scores(unbounded, masks), pixel_scores(scaled, masks)
    assert_pixel_scores_match(raw, unbounded, masks)
    for key in ("auroc", "aupro", "ap", "f1"):  # invariance under a monotone rescaling
        assert raw[key] == pytest.approx(ref[key], abs=1e-12)


def test_pixel_metrics_accumulated_equals_one_shot():
    maps, masks = random_maps_with_regions(4, n=9)
    maps = maps * 50 - 10  # unbounded
    metric = PixelMetrics(fpr_limit=0.3)
    for start in range(0, 9, 4):  # batches of 4, 4, 1; with a channel axis and float masks
        metric.update(torch.from_numpy(maps[start : start + 4, None]), torch.from_numpy(masks[start : start + 4, None].astype(np.float32)))
    result = metric.compute()
    assert {"pixel_auroc", "pixel_aupro", "pixel_aupr", "pixel_f1", "pixel_f1_threshold"} <= set(result)
    got = {"auroc": result["pixel_auroc"], "aupro": result["pixel_aupro"], "ap": result["pixel_aupr"],
           "f1": result["pixel_f1"], "f1_threshold": result["pixel_f1_threshold"]}
    assert_pixel_scores_match(got, maps, masks, 0.3)  # scikit-learn and brute force, not pixel_scores


def test_pixel_metrics_rejects_mismatched_shapes():
    with pytest.raises(TexadError):
        PixelMetrics().update(torch.zeros(2, 8, 8), torch.zeros(2, 4, 4))


def test_image_metrics_match_sklearn():
    rng = np.random.default_rng(5)
    labels = rng.random(60) < 0.4
    scores = np.round(rng.normal(size=60) * 100 + 80 * labels)  # unbounded, tied
    metric = ImageMetrics()
    for batch in np.array_split(np.arange(60), 4):
        metric.update(torch.from_numpy(scores[batch]), torch.from_numpy(labels[batch].astype(np.int64)))
    result = metric.compute()
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["image_f1"] == pytest.approx(sklearn_best_f1(scores, labels), abs=1e-12)
    assert result["image_f1_threshold"] in set(scores[labels])


def test_aupro_when_anomalies_score_below_most_normal_pixels():
    """Positives far below the FPR cut (skipped by the partial sort) must not change the area."""
    maps, masks = random_maps_with_regions(2)
    maps = np.where(masks, maps - 3.0, maps).astype(np.float32)
    expected = brute_force_aupro(maps, masks, 0.3)
    assert aupro(maps, masks, 0.3) == pytest.approx(expected, abs=1e-4)
    maps[0, 0, 0], masks[0, 0, 0] = 10.0, True  # one positive on top, the rest below the cut
    assert aupro(maps, masks, 0.3) == pytest.approx(brute_force_aupro(maps, masks, 0.3), abs=1e-4)


def test_shared_pixel_points_give_the_same_scores_and_curves():
    """The writer sorts once (pixel_operating_points); every figure must equal the standalone functions."""
    from texad.metrics.functional import (
        operating_points,
        pixel_operating_points,
        pixel_scores_from,
        pro_curve,
        pro_curve_from,
    )

    rng = np.random.default_rng(3)
    masks = np.zeros((4, 24, 24), bool)
    masks[1, 3:8, 4:9] = True
    masks[2, 10:20, 2:5] = True
    masks[2, 0:2, 20:24] = True
    maps = (masks * 0.7 + rng.normal(size=masks.shape)).astype(np.float32)
    maps[0, :4, :4] = 1.25  # ties
    points, n_regions = pixel_operating_points(maps, masks)
    reference = operating_points(maps, masks)
    for field in ("thresholds", "tps", "fps"):
        assert np.array_equal(getattr(points, field), getattr(reference, field)), field
    assert (points.n_pos, points.n_neg, n_regions) == (reference.n_pos, reference.n_neg, 3)
    assert_pixel_scores_match(pixel_scores_from(points, n_regions, 0.3), maps, masks, 0.3)
    for got, want in zip(pro_curve_from(points, n_regions, 1.0), pro_curve(maps, masks, 1.0)):
        assert np.array_equal(got, want)
    empty = pro_curve_from(*pixel_operating_points(maps, np.zeros_like(masks)), 1.0)
    assert empty[0].size == 0 and empty[1].size == 0
