"""Bootstrap intervals: against scipy.stats.bootstrap, binned pixel metrics against the exact ones,
stratification, and paired differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

from texad.metrics.aupimo import aupimo_per_image
from texad.metrics.bootstrap import (
    TestStatistics,
    collect_statistics,
    intervals,
    metric_replicates,
    paired_differences,
    replicate_weights,
)
from texad.metrics.functional import f1_at_threshold, image_scores, roc_auc
from texad.metrics.border import ring_ratio
from texad.metrics.offset import defect_alignment, offset_record
from texad.metrics.pixel import pixel_metric_record


def synthetic_set(n_good: int = 30, n_bad: int = 30, side: int = 64, seed: int = 0, shift: float = 1.0):
    """Maps with planted square defects (stronger with `shift`) and scores from the maps' maxima."""
    g = torch.Generator().manual_seed(seed)
    n = n_good + n_bad
    maps = torch.rand(n, side, side, generator=g)
    masks = torch.zeros(n, side, side, dtype=torch.bool)
    for i in range(n_good, n):
        y, x = torch.randint(2, side - 12, (2,), generator=g).tolist()
        h, w = torch.randint(3, 10, (2,), generator=g).tolist()
        masks[i, y:y + h, x:x + w] = True
        maps[i, y:y + h, x:x + w] += shift * torch.rand(1, generator=g)
    labels = torch.tensor([0] * n_good + [1] * n_bad)
    types = ["good"] * n_good + ["a" if i % 2 else "b" for i in range(n_bad)]
    paths = [f"img{i:03d}" for i in range(n)]
    return maps, masks, labels, types, paths


def test_image_auroc_interval_matches_scipy_bootstrap():
    g = np.random.default_rng(3)
    normal, defective = g.normal(0, 1, 40), g.normal(0.8, 1, 25)
    scores = np.concatenate([normal, defective])
    labels = np.array([0] * 40 + [1] * 25)
    stats = TestStatistics(paths=[str(i) for i in range(65)], labels=labels, defect_types=["x"] * 65, scores=scores)
    ours = intervals(stats, n=4000, seed=1)["image_auroc"]

    def auroc(a, b):
        return roc_auc(np.concatenate([a, b]), np.array([0] * len(a) + [1] * len(b)))

    # two samples resampled independently = our stratification (normals and defective images apart)
    ref = sps.bootstrap((normal, defective), auroc, vectorized=False, paired=False, n_resamples=4000,
                        method="percentile", random_state=np.random.default_rng(7)).confidence_interval
    assert abs(ours[0] - ref.low) < 0.015 and abs(ours[1] - ref.high) < 0.015, (ours, ref)


def test_replicates_keep_the_class_counts():
    labels = np.array([0] * 7 + [1] * 3)
    w = replicate_weights(labels, 50, seed=0)
    assert (w[:, :7].sum(1) == 7).all() and (w[:, 7:].sum(1) == 3).all()
    assert np.array_equal(w, replicate_weights(labels, 50, seed=0))


def test_all_ones_weights_give_the_exact_metrics():
    maps, masks, labels, types, paths = synthetic_set()
    scores = maps.flatten(1).amax(1)
    exact = pixel_metric_record(maps, masks)
    thresholds = {"pixel": float(exact["pixel_f1_threshold"]), "image": float(image_scores(scores, labels)["image_f1_threshold"])}
    aupimo = aupimo_per_image(maps, masks)
    stats = collect_statistics(scores, labels, paths, types, maps, masks, aupimo, thresholds)
    got = {k: float(v[0]) for k, v in metric_replicates(stats, np.ones((1, len(paths)))).items()}
    for key in ("pixel_auroc", "pixel_aupro", "pixel_aupr", "pixel_f1"):
        assert abs(got[key] - exact[key]) < 2e-3, (key, got[key], exact[key])
    assert abs(got["pixel_f1_at_val"] - f1_at_threshold(maps.flatten(), masks.flatten(), thresholds["pixel"])) < 1e-9
    image = image_scores(scores, labels)
    assert abs(got["image_auroc"] - image["image_auroc"]) < 1e-12 and abs(got["image_f1"] - image["image_f1"]) < 1e-12
    assert abs(got["image_f1_at_val"] - f1_at_threshold(scores, labels, thresholds["image"])) < 1e-12
    assert np.isfinite(aupimo).any() and abs(got["pixel_aupimo"] - np.nanmean(aupimo)) < 1e-12
    assert abs(got["ring_ratio"] - ring_ratio(maps[labels == 0])) < 1e-9
    offset = offset_record(defect_alignment(maps, masks.float()))
    assert (got["map_offset_dy"], got["map_offset_dx"]) == pytest.approx((offset["map_offset_dy"], offset["map_offset_dx"]), abs=0.01)
    keep = np.array([t in ("good", "a") for t in types])
    assert abs(got["image_auroc_per_type/a"] - roc_auc(scores[keep], labels[keep])) < 1e-12


def test_pixel_intervals_contain_the_estimate_and_shrink_with_more_images(tmp_path):
    small = synthetic_set(10, 10, seed=1)
    large = synthetic_set(60, 60, seed=1)
    widths = []
    for maps, masks, labels, types, paths in (small, large):
        stats = collect_statistics(maps.flatten(1).amax(1), labels, paths, types, maps, masks)
        ci = intervals(stats, n=400)
        point = pixel_metric_record(maps, masks)["pixel_aupr"]
        assert ci["pixel_aupr"][0] <= point <= ci["pixel_aupr"][1]
        widths.append(ci["pixel_aupr"][1] - ci["pixel_aupr"][0])
        stats.save(tmp_path / "s.npz")
        again = TestStatistics.load(tmp_path / "s.npz")
        assert intervals(again, n=400) == ci
    assert widths[1] < widths[0]


def test_paired_difference_excludes_zero_only_for_a_real_difference():
    maps, masks, labels, types, paths = synthetic_set(40, 40, seed=2, shift=1.0)
    strong = collect_statistics(maps.flatten(1).amax(1), labels, paths, types, maps, masks)
    noisy = maps + 0.8 * torch.rand(maps.shape, generator=torch.Generator().manual_seed(5))
    weak = collect_statistics(noisy.flatten(1).amax(1), labels, paths, types, noisy, masks)
    diff = paired_differences([strong], [weak], n=400)
    assert diff["pixel_aupr"]["difference"] > 0 and diff["pixel_aupr"]["excludes_zero"]
    same = paired_differences([strong], [strong.reordered(np.arange(len(paths))[::-1])], n=400)
    assert same["pixel_aupr"]["difference"] == pytest.approx(0.0, abs=1e-12)
    assert not same["pixel_aupr"]["excludes_zero"]
