"""AUPIMO against a brute-force computation and against the reference's sampled-threshold rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from texad.errors import TexadError
from texad.metrics.aupimo import aupimo_per_image, pixel_aupimo
from texad.metrics.pixel import PixelMetrics


def _stack(rng, n_normal=6, n_anomalous=4, size=160, ties=False):
    """Normal images (empty masks) and anomalous images with a square defect that scores higher."""
    maps = rng.standard_normal((n_normal + n_anomalous, size, size)).astype(np.float32)
    masks = np.zeros(maps.shape, bool)
    for k in range(n_anomalous):
        i = n_normal + k
        r, c, s = rng.integers(0, size - 40), rng.integers(0, size - 40), 10 + 6 * k
        masks[i, r : r + s, c : c + s] = True
        maps[i][masks[i]] += 2.5 + 0.7 * k
    if ties:
        maps = np.round(maps * 32) / 32  # many equal scores, across normal and anomalous pixels
    return maps, masks


def brute_force_aupimo(maps, masks, lower=1e-5, upper=1e-4):
    """Every distinct score is a threshold; FPR and TPR counted directly; the curve is linear in
    log10(FPR) between consecutive thresholds (the trapezoid rule) and integrated over the window by
    clipping each segment. Independent of the implementation's vertex bookkeeping."""
    maps = maps.astype(np.float64)
    anomalous = masks.reshape(len(masks), -1).any(1)
    normal_scores = maps[~anomalous].ravel()
    out = np.full(len(maps), np.nan)
    lo, hi = math.log10(lower), math.log10(upper)
    # thresholds below the normal score of rank ceil(upper * n) + 2 only add points beyond the window
    floor = np.sort(normal_scores)[::-1][min(normal_scores.size - 1, math.ceil(upper * normal_scores.size) + 2)]
    for i in np.flatnonzero(anomalous):
        pos = maps[i][masks[i]]
        every = np.unique(np.concatenate([normal_scores, pos]))[::-1]
        thresholds = every[every >= floor]
        fpr = np.array([(normal_scores >= t).mean() for t in thresholds])
        tpr = np.array([(pos >= t).mean() for t in thresholds])
        keep = fpr > 0
        x, y = np.log10(fpr[keep]), tpr[keep]
        assert x[0] <= lo
        area = 0.0
        for j in range(len(x) - 1):
            if x[j + 1] <= x[j]:
                continue
            a, b = max(x[j], lo), min(x[j + 1], hi)
            if b <= a:
                continue
            f = lambda z: y[j] + (y[j + 1] - y[j]) * (z - x[j]) / (x[j + 1] - x[j])  # noqa: E731
            area += (b - a) * (f(a) + f(b)) / 2
        out[i] = area / (hi - lo)
    return out


@pytest.mark.parametrize("ties", [False, True])
def test_aupimo_equals_brute_force(ties):
    rng = np.random.default_rng(3)
    maps, masks = _stack(rng, ties=ties)
    got = aupimo_per_image(maps, masks)
    want = brute_force_aupimo(maps, masks)
    assert np.isnan(got[:6]).all() and np.isnan(want[:6]).all()
    np.testing.assert_allclose(got[6:], want[6:], rtol=0, atol=1e-9)
    assert 0.0 < got[6:].min() and got[6:].max() <= 1.0
    assert len(set(np.round(got[6:], 6))) > 1  # images really differ
    assert pixel_aupimo(maps, masks) == pytest.approx(np.mean(want[6:]), abs=1e-12)


def test_other_bounds_equal_brute_force():
    rng = np.random.default_rng(5)
    maps, masks = _stack(rng, n_normal=3, size=64)
    got = aupimo_per_image(maps, masks, fpr_bounds=(1e-3, 3e-2))
    want = brute_force_aupimo(maps, masks, 1e-3, 3e-2)
    np.testing.assert_allclose(got[3:], want[3:], atol=1e-9)


def test_close_to_the_reference_sampled_threshold_rule():
    """The reference samples K thresholds evenly over the normal scores' range, takes the samples
    whose shared FPR is closest to the bounds, and integrates the trapezoid in log FPR. With many
    samples it approaches the exact value (our reading of the method, re-implemented here). Enough
    normal pixels (1.3M: 13 in the first 1e-5) that rounding the bounds to a sample matters little."""
    rng = np.random.default_rng(7)
    maps, masks = _stack(rng, n_normal=20, size=256)
    anomalous = masks.reshape(len(masks), -1).any(1)
    normal = np.sort(maps[~anomalous].ravel())
    thresholds = np.linspace(normal[0], normal[-1], 200_000)
    fpr = 1.0 - np.searchsorted(normal, thresholds, side="left") / normal.size  # descending
    i_lo = int(np.argmin(np.abs(fpr - 1e-4)))  # threshold-index lower bound = FPR upper bound
    i_hi = int(np.argmin(np.abs(fpr - 1e-5)))
    x = np.log(fpr[i_lo : i_hi + 1])[::-1]
    exact = aupimo_per_image(maps, masks)
    for i in np.flatnonzero(anomalous):
        pos = np.sort(maps[i][masks[i]])
        tpr = (1.0 - np.searchsorted(pos, thresholds[i_lo : i_hi + 1], side="left") / pos.size)[::-1]
        ref = np.trapezoid(tpr, x) / math.log(10.0)
        assert exact[i] == pytest.approx(ref, abs=0.01)


def test_perfect_and_hopeless_maps():
    maps = np.zeros((4, 256, 256), np.float32)  # two normal images: 131072 normal pixels >= 1e5
    masks = np.zeros(maps.shape, bool)
    masks[2:, 10:20, 10:20] = True
    rng = np.random.default_rng(0)
    maps[:] = rng.random(maps.shape)
    perfect = maps.copy()
    perfect[masks] = 5.0
    np.testing.assert_allclose(aupimo_per_image(perfect, masks)[2:], 1.0)
    hopeless = maps.copy()
    hopeless[masks] = -1.0
    np.testing.assert_allclose(aupimo_per_image(hopeless, masks)[2:], 0.0)


def test_undefined_cases_are_nan_and_bad_bounds_raise():
    rng = np.random.default_rng(1)
    maps, masks = _stack(rng, n_normal=1, n_anomalous=2, size=64)  # 4096 normal pixels: 1/4096 > 1e-5
    assert np.isnan(aupimo_per_image(maps, masks)).all()
    assert math.isnan(pixel_aupimo(maps[1:], masks[1:]))  # no normal image
    assert math.isnan(pixel_aupimo(maps[:1], masks[:1]))  # no anomalous image
    with pytest.raises(TexadError, match="fpr_bounds"):
        aupimo_per_image(maps, masks, fpr_bounds=(1e-4, 1e-5))


def test_pixel_metrics_report_aupimo_and_per_image_values():
    rng = np.random.default_rng(2)
    maps, masks = _stack(rng)
    metric = PixelMetrics()
    for s in range(0, len(maps), 4):
        metric.update(torch.from_numpy(maps[s : s + 4]), torch.from_numpy(masks[s : s + 4]))
    out = metric.compute()
    assert out["pixel_aupimo"] == pytest.approx(pixel_aupimo(maps, masks), abs=1e-12)
    np.testing.assert_allclose(metric.per_image["pixel_aupimo"], aupimo_per_image(maps, masks), equal_nan=True)
