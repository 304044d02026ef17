"""AUPIMO: area under the per-image overlap curve (Bertoldo et al., BMVC 2024), exact.

Follows the paper and its reference code (jpcbertoldo/aupimo, also in anomalib):

* the x-axis is the false-positive rate measured on the NORMAL images only (images whose mask is
  empty): the mean of their per-image FPRs. All maps here have the same size, so this equals the
  FPR pooled over all their pixels, which is what is computed;
* each ANOMALOUS image i has its own curve, TPR_i(t) = fraction of its anomalous pixels scoring
  ``>= t`` (its "overlap" with the ground truth);
* AUPIMO_i is the area under TPR_i over log10(FPR) in ``[fpr_bounds]`` (1e-5, 1e-4 by default),
  divided by the width of that log range, so it lies in [0, 1];
* ``pixel_aupimo`` is the mean over anomalous images.

Where this deviates from the reference code, and why: the reference samples 300 000 thresholds
evenly between the normal images' min and max score, integrates with a trapezoid in log FPR, and
cuts the range at the sampled thresholds whose FPR is *closest* to each bound. Here the curve is
exact: its vertices are at every distinct normal score (the only places where FPR moves), the
trapezoid rule in log FPR is applied between them, and the curve is interpolated at exactly the
two bounds. This is the limit of the reference computation as its thresholds get denser (between
two consecutive normal scores FPR is constant and TPR only grows, so the dense sampling meets the
same points). Cost: a linear-time partition of the normal scores (only the top ``upper bound``
fraction is sorted) and one sort of each anomalous image's anomalous pixels.

Undefined cases give ``nan`` (``null`` in metrics.json): no normal or no anomalous image, or too
few normal pixels to reach the lower bound (the smallest positive FPR, 1 / #normal pixels, must be
``<= fpr_bounds[0]``: 1e-5 needs at least 100 000 normal pixels, e.g. two 256² images). Points at
FPR = 0 have no place on a log axis, so the curve starts at the first positive FPR.
"""

from __future__ import annotations

import math

import numpy as np

from texad.errors import TexadError
from texad.metrics.functional import _bool_stack, _scores_array

__all__ = ["DEFAULT_FPR_BOUNDS", "aupimo_per_image", "pixel_aupimo", "check_fpr_bounds"]

DEFAULT_FPR_BOUNDS = (1e-5, 1e-4)


def check_fpr_bounds(fpr_bounds) -> tuple[float, float]:
    try:
        lower, upper = (float(b) for b in fpr_bounds)
    except (TypeError, ValueError) as err:
        raise TexadError(f"AUPIMO fpr_bounds must be two numbers (lower, upper), got {fpr_bounds!r}") from err
    if not 0.0 < lower < upper <= 1.0:
        raise TexadError(f"AUPIMO fpr_bounds must satisfy 0 < lower < upper <= 1, got {fpr_bounds!r}")
    return lower, upper


def _window_area(x0, x1, y0, y1, lo: float, hi: float) -> np.ndarray:
    """Integral over [lo, hi] of the polyline made of segments (x0→x1, y0→y1); y has shape (n, S).

    Segments of zero width (vertical jumps) add nothing; each segment is clipped to the window and
    its values interpolated linearly at the clip points.
    """
    width = x1 - x0
    a = np.maximum(x0, lo)
    b = np.minimum(x1, hi)
    keep = (b > a) & (width > 0)
    if not keep.any():
        return np.zeros(y0.shape[0])
    x0, width, a, b = x0[keep], width[keep], a[keep], b[keep]
    y0, y1 = y0[:, keep], y1[:, keep]
    slope = (y1 - y0) / width
    ya = y0 + slope * (a - x0)
    yb = y0 + slope * (b - x0)
    return np.sum((b - a) * (ya + yb) / 2.0, axis=1)


def aupimo_per_image(maps, masks, fpr_bounds=DEFAULT_FPR_BOUNDS) -> np.ndarray:
    """AUPIMO of every image of an (N, H, W) stack: a float64 array (N,), nan for normal images.

    All entries are nan when the metric is undefined (see the module docstring).
    """
    lower, upper = check_fpr_bounds(fpr_bounds)
    scores = _scores_array(maps)
    stack = _bool_stack(masks)
    if scores.size != stack.size:
        raise TexadError(f"anomaly maps have {scores.size} elements but masks have {stack.size}")
    n_images = stack.shape[0]
    scores = scores.reshape(n_images, -1)
    flat = stack.reshape(n_images, -1)
    anomalous = flat.any(axis=1)
    out = np.full(n_images, np.nan)
    if anomalous.all() or not anomalous.any():
        return out
    negatives = scores[~anomalous].reshape(-1).copy()
    n_neg = negatives.size
    if 1.0 / n_neg > lower:
        return out
    # only the top `upper` fraction of normal scores (and one more level) can matter
    needed = min(n_neg, math.ceil(upper * n_neg) + 1)
    if needed < n_neg:
        negatives.partition(n_neg - needed)
        cut = negatives[n_neg - needed]
        negatives = negatives[negatives >= cut]  # every tie of the cut, so the counts stay exact
    negatives.sort()
    levels = np.unique(negatives)[::-1]  # distinct normal scores, descending
    fps = negatives.size - np.searchsorted(negatives, levels, side="left")  # normal pixels >= level
    fpr = fps / n_neg
    if fpr[0] > lower:  # the top normal score is tied by too many pixels to resolve the lower bound
        return out
    log_fpr = np.log10(fpr)
    # segment j goes from (log fpr_j, TPR(> level_{j+1})) to (log fpr_{j+1}, TPR(>= level_{j+1}))
    x0, x1, nxt = log_fpr[:-1], log_fpr[1:], levels[1:]
    idx = np.flatnonzero(anomalous)
    above = np.empty((idx.size, nxt.size))
    at = np.empty_like(above)
    for row, i in enumerate(idx):
        pos = np.sort(scores[i][flat[i]])
        above[row] = (pos.size - np.searchsorted(pos, nxt, side="right")) / pos.size
        at[row] = (pos.size - np.searchsorted(pos, nxt, side="left")) / pos.size
    lo, hi = math.log10(lower), math.log10(upper)
    area = _window_area(x0, x1, above, at, lo, hi)
    out[idx] = np.clip(area / (hi - lo), 0.0, 1.0)
    return out


def pixel_aupimo(maps, masks, fpr_bounds=DEFAULT_FPR_BOUNDS) -> float:
    """Mean AUPIMO over the anomalous images (nan where undefined)."""
    values = aupimo_per_image(maps, masks, fpr_bounds)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")
