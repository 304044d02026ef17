"""Exact threshold-free anomaly metrics (AUROC, AP, best F1, AUPRO) from one sort of the scores.

All these metrics only change where a *positive* (anomalous) sample crosses the
threshold: between two consecutive positive scores the curves move along straight
lines (only negatives enter), so their areas and maxima are fixed by the operating
points at the distinct positive scores.  We therefore

1. sort the negative scores (values only: numpy's SIMD sort, ~10x faster on CPU than
   ``torch.sort``/``argsort``, which must also carry a permutation),
2. sort the few positive scores descending and merge their tie runs,
3. count the negatives at or above each distinct positive score by binary search.

Ties are handled exactly (a threshold cannot split equal scores), so the results
equal scikit-learn's ``roc_auc_score`` / ``average_precision_score`` and the best F1 on
``precision_recall_curve``; AUPRO follows the MVTec AD definition (Bergmann et al.,
IJCV 2021).  Inputs may be torch tensors or numpy arrays; outputs are python floats or
numpy arrays.  Counts are int64 and sums float64.

Undefined cases return ``nan`` instead of raising (one class absent happens for a single
batch or an all-good split):

* ``roc_auc``: nan without positives or without negatives.
* ``average_precision``: nan without positives (sklearn warns and returns a meaningless
  value); 1.0 without negatives, as sklearn.
* ``best_f1``: ``(nan, nan)`` without positives; defined without negatives.
* ``aupro`` / ``pro_curve``: nan / empty without anomalous regions or without normal pixels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage

from texad.errors import TexadError

__all__ = [
    "OperatingPoints",
    "operating_points",
    "roc_auc",
    "average_precision",
    "best_f1",
    "f1_at_threshold",
    "image_scores",
    "label_regions",
    "aupro",
    "pro_curve",
    "pixel_scores",
    "pixel_operating_points",
    "pixel_scores_from",
    "pro_curve_from",
]


class OperatingPoints(NamedTuple):
    """Confusion counts at each distinct positive score, highest first (predict ``score >= t``).

    ``fps_above`` counts negatives strictly above ``t``: together with ``fps`` it gives the
    diagonal segment a tie between positives and negatives draws on ROC/PRO curves.
    ``pro`` (only for pixel maps) is the mean per-region overlap at ``t``.
    """

    thresholds: np.ndarray  # strictly decreasing distinct positive scores
    tps: np.ndarray  # int64, positives with score >= t
    fps: np.ndarray  # int64, negatives with score >= t
    fps_above: np.ndarray  # int64, negatives with score > t
    n_pos: int
    n_neg: int
    pro: np.ndarray | None = None  # float64, PRO(t)


# --------------------------------------------------------------------------- input handling


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _scores_array(scores) -> np.ndarray:
    """Flat float32/float64 scores; NaN is rejected (it has no rank)."""
    s = _to_numpy(scores).reshape(-1)
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float32 if s.dtype == np.float16 else np.float64)
    if np.isnan(s).any():
        raise TexadError("anomaly scores contain NaN; metrics are undefined for NaN scores")
    return s


def _binary_array(targets) -> np.ndarray:
    """Flat bool: bool as is, anything else ``> 0.5`` (works for 0/1, 0/255 and resized soft masks)."""
    t = _to_numpy(targets).reshape(-1)
    return t if t.dtype == np.bool_ else t > 0.5


def _check_same_size(scores: np.ndarray, targets: np.ndarray) -> None:
    if scores.size != targets.size:
        raise TexadError(f"scores have {scores.size} elements but targets have {targets.size}")


# --------------------------------------------------------------------------- ranking core


def _descending_float32_keys(scores: np.ndarray) -> np.ndarray:
    """uint32 keys whose ascending order is the descending order of float32 scores."""
    bits = (scores + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into +0.0 (a tie)
    negative = bits >= np.uint32(0x8000_0000)
    return np.where(negative, bits, ~bits & np.uint32(0x7FFF_FFFF))


def _float32_from_keys(keys: np.ndarray) -> np.ndarray:
    negative = keys >= np.uint32(0x8000_0000)
    return np.where(negative, keys, ~keys & np.uint32(0x7FFF_FFFF)).view(np.float32)


def _sort_descending(scores: np.ndarray, payload: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores in descending order with their payload (order inside a tie run is arbitrary).

    float32 scores and a payload in [0, 2**32) are packed into one uint64 and sorted by
    value, avoiding the slow indirect argsort; float64 scores fall back to argsort.
    """
    if scores.dtype == np.float32 and (payload.size == 0 or int(payload.max()) < 2**32):
        keys = _descending_float32_keys(scores).astype(np.uint64) << np.uint64(32)
        keys |= payload.astype(np.uint64)
        keys.sort()
        sorted_scores = _float32_from_keys((keys >> np.uint64(32)).astype(np.uint32))
        return sorted_scores, (keys & np.uint64(0xFFFF_FFFF)).astype(np.int64)
    order = np.argsort(-scores)
    return scores[order], payload[order].astype(np.int64)


def _tie_run_ends(sorted_scores: np.ndarray) -> np.ndarray:
    """Index of the last element of each run of equal scores."""
    if sorted_scores.size == 0:
        return np.zeros(0, dtype=np.int64)
    boundaries = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    return np.append(boundaries, sorted_scores.size - 1)


def _count_at_or_above(sorted_ascending: np.ndarray, thresholds_desc: np.ndarray):
    """(#values >= t, #values > t) for each t, by binary search in ascending values.

    When only the top of the values was sorted (see ``_top_negatives``) the counts are
    exact for every t at or above the smallest kept value and too small below it.
    """
    n = sorted_ascending.size
    queries = thresholds_desc[::-1]  # ascending keys let numpy reuse the previous bound
    left = np.searchsorted(sorted_ascending, queries, side="left")
    above = n - left
    # Only thresholds equal to some value need the second search (rare for real maps).
    tied = sorted_ascending[np.minimum(left, n - 1)] == queries if n else np.zeros(queries.shape, bool)
    if tied.any():
        above[tied] = n - np.searchsorted(sorted_ascending, queries[tied], side="right")
    return (n - left)[::-1].astype(np.int64), above[::-1].astype(np.int64)


def _operating_points(
    positive_scores: np.ndarray,
    sorted_negatives: np.ndarray,
    n_neg: int,
    positive_regions: np.ndarray | None = None,
    region_weights: np.ndarray | None = None,
) -> OperatingPoints:
    """Operating points from positives (any order) and ascending negatives.

    With ``positive_regions`` (region id per positive) the PRO contribution
    ``region_weights[id]`` of each pixel travels with it through the sort.
    """
    n_pos = positive_scores.size
    if positive_regions is None:
        sorted_pos = np.sort(positive_scores)[::-1]
        pro_steps = None
    else:
        sorted_pos, sorted_regions = _sort_descending(positive_scores, positive_regions)
        pro_steps = region_weights[sorted_regions]
    ends = _tie_run_ends(sorted_pos)
    thresholds = sorted_pos[ends]
    fps, fps_above = _count_at_or_above(sorted_negatives, thresholds)
    pro = None if pro_steps is None else np.minimum(np.cumsum(pro_steps)[ends], 1.0)
    return OperatingPoints(thresholds, ends + 1, fps, fps_above, n_pos, n_neg, pro)


def operating_points(scores, targets) -> OperatingPoints:
    """Counts at every distinct positive score from one sort: the basis of the metrics below."""
    s, t = _scores_array(scores), _binary_array(targets)
    _check_same_size(s, t)
    negatives = np.sort(s[~t])
    return _operating_points(s[t], negatives, negatives.size)


# --------------------------------------------------------------------------- points -> metric


def _roc_auc_of(points: OperatingPoints) -> float:
    """Mann-Whitney form of the trapezoid ROC area: a tie with a negative counts one half."""
    if points.n_pos == 0 or points.n_neg == 0:
        return float("nan")
    positives_per_threshold = np.diff(points.tps, prepend=0).astype(np.float64)
    below = points.n_neg - points.fps  # negatives strictly below t
    at_or_below = points.n_neg - points.fps_above
    wins = np.sum(positives_per_threshold * (below + at_or_below).astype(np.float64)) / 2.0
    return float(wins / (float(points.n_pos) * float(points.n_neg)))


def _average_precision_of(points: OperatingPoints) -> float:
    """AP = sum_k (R_k - R_{k-1}) P_k over thresholds: a step sum, no interpolation (as sklearn)."""
    if points.n_pos == 0:
        return float("nan")
    precision = points.tps / (points.tps + points.fps)
    recall_gain = np.diff(points.tps, prepend=0) / points.n_pos
    return float(np.sum(recall_gain * precision))


def _best_f1_of(points: OperatingPoints) -> tuple[float, float]:
    """For a fixed TP count F1 grows as FP shrinks, so the max is at a positive score."""
    if points.n_pos == 0:
        return float("nan"), float("nan")
    f1 = 2.0 * points.tps / (points.tps + points.fps + points.n_pos)  # = 2PR / (P + R)
    best = int(np.argmax(f1))
    return float(f1[best]), float(points.thresholds[best])


def roc_auc(scores, targets) -> float:
    """Exact area under the ROC curve (ties as in sklearn); nan if a class is absent."""
    return _roc_auc_of(operating_points(scores, targets))


def average_precision(scores, targets) -> float:
    """AP exactly as sklearn's ``average_precision_score`` (step sum, not a trapezoid AUPR)."""
    return _average_precision_of(operating_points(scores, targets))


def image_scores(scores, labels) -> dict[str, float]:
    """Image AUROC and best F1 (and its threshold) from one sort, under the metrics.json keys."""
    points = operating_points(scores, labels)
    f1, threshold = _best_f1_of(points)
    return {"image_auroc": _roc_auc_of(points), "image_f1": f1, "image_f1_threshold": threshold}


def best_f1(scores, targets) -> tuple[float, float]:
    """Max F1 over all thresholds and the threshold reaching it (predict ``score >= threshold``)."""
    return _best_f1_of(operating_points(scores, targets))


def f1_at_threshold(scores, targets, threshold: float) -> float:
    """F1 of predicting ``score >= threshold`` (a threshold chosen elsewhere, e.g. on validation).

    nan when there is no positive target (F1 undefined); 0 when nothing is predicted positive.
    """
    s = _scores_array(scores)
    t = _binary_array(targets)
    _check_same_size(s, t)
    if not math.isfinite(float(threshold)) or not t.any():
        return float("nan")
    predicted = s >= threshold
    tp = int(np.count_nonzero(predicted & t))
    fp = int(np.count_nonzero(predicted & ~t))
    fn = int(np.count_nonzero(~predicted & t))
    return 2.0 * tp / (2 * tp + fp + fn)


# --------------------------------------------------------------------------- per-region overlap


def _bool_stack(masks) -> np.ndarray:
    m = _to_numpy(masks)
    m = m if m.dtype == np.bool_ else m > 0.5
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    elif m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise TexadError(f"masks must be (N, H, W), (N, 1, H, W) or (H, W), got shape {m.shape}")
    return m


def _label_rows(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Label 8-connected regions of an (N, H, W) bool stack, looking only at non-empty rows.

    Anomalies cover a few percent of the rows, so the images' rows that contain a
    positive are stacked into one compact 2-D array (one empty row kept between
    non-adjacent rows and between images, which keeps regions apart) and labelled in a
    single ``ndimage.label`` call.  Returns (indices of the non-empty rows in the
    (N*H, W) view, their labels (len, W), number of regions).
    """
    n_images, height, width = stack.shape
    rows = stack.reshape(n_images * height, width)
    nonempty = np.flatnonzero(rows.any(axis=1))
    if nonempty.size == 0:
        return nonempty, np.zeros((0, width), dtype=np.int32), 0
    gap = (np.diff(nonempty) > 1) | (np.diff(nonempty // height) > 0)
    compact_index = np.arange(nonempty.size) + np.concatenate([[0], np.cumsum(gap)])
    compact = np.zeros((compact_index[-1] + 1, width), dtype=bool)
    compact[compact_index] = rows[nonempty]
    labels, n_regions = ndimage.label(compact, structure=np.ones((3, 3), dtype=bool))
    return nonempty, labels[compact_index], int(n_regions)


def label_regions(masks) -> tuple[np.ndarray, int]:
    """8-connected components of each (H, W) mask of an (N, H, W) stack, ids unique over the stack.

    Returns (int32 labels of shape (N, H, W) with 0 = normal pixel, number of regions).
    """
    stack = _bool_stack(masks)
    n_images, height, width = stack.shape
    labels = np.zeros((n_images * height, width), dtype=np.int32)
    nonempty, row_labels, n_regions = _label_rows(stack)
    labels[nonempty] = row_labels
    return labels.reshape(stack.shape), n_regions


class _PixelSplit(NamedTuple):
    positive_scores: np.ndarray
    positive_regions: np.ndarray  # region id (1..n_regions) of each positive pixel
    region_weights: np.ndarray  # 1 / (|region| * n_regions), index 0 unused
    negative_scores: np.ndarray  # unsorted
    n_regions: int


def _split_pixels(maps, masks) -> _PixelSplit:
    """Scores of anomalous pixels with their region id, and scores of normal pixels."""
    s = _scores_array(maps)
    stack = _bool_stack(masks)
    _check_same_size(s, stack)
    flat_mask = stack.reshape(-1)
    negatives = s[~flat_mask]
    positive_scores = s[flat_mask]  # row-major, the same order as the labelled rows below
    nonempty, row_labels, n_regions = _label_rows(stack)
    positive_regions = row_labels[stack.reshape(-1, stack.shape[2])[nonempty]]
    sizes = np.bincount(positive_regions, minlength=n_regions + 1).astype(np.float64)
    weights = np.zeros(n_regions + 1)
    if n_regions:
        weights[1:] = 1.0 / (sizes[1:] * n_regions)
    return _PixelSplit(positive_scores, positive_regions, weights, negatives, n_regions)


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise TexadError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def _top_negatives(negatives: np.ndarray, fpr_limit: float) -> tuple[np.ndarray, float]:
    """Ascending negatives that can matter up to FPR = ``fpr_limit``, and the cut score.

    The curve up to the limit (and its first vertex beyond) involves only thresholds at or
    above the k-th highest negative, k = ceil(limit * n_neg) + 1 (one spare for
    rounding); a linear-time partition finds it, so only ~limit of the negatives get
    sorted, and positives below the cut can be ignored too.

    Works in place on ``negatives`` (a private array from ``_split_pixels``): copies of
    7.5M scores cost as much as the partition itself.
    """
    n_neg = negatives.size
    needed = min(n_neg, math.ceil(fpr_limit * n_neg) + 1)
    if needed < n_neg:
        negatives.partition(n_neg - needed)
        cut = negatives[n_neg - needed]
        negatives = negatives[negatives >= cut]  # all ties of the cut, so counts stay exact
    negatives.sort()
    return negatives, (float(negatives[0]) if needed < n_neg else -math.inf)


def _pro_curve_of(points: OperatingPoints, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, PRO) polyline from (0, 0) to FPR = fpr_limit.

    Vertices: for each positive tie run, the point before it enters (negatives strictly
    above) and after (negatives at or above); between runs the curve is horizontal.
    The last vertex is PRO linearly interpolated at exactly ``fpr_limit``.
    """
    pro_before = np.concatenate([[0.0], points.pro[:-1]])
    fpr = np.empty(2 * points.thresholds.size + 2)
    pro = np.empty_like(fpr)
    fpr[0], pro[0] = 0.0, 0.0
    fpr[1:-1:2], pro[1:-1:2] = points.fps_above / points.n_neg, pro_before
    fpr[2:-1:2], pro[2:-1:2] = points.fps / points.n_neg, points.pro
    # Horizontal to FPR = 1 after the last run: exact up to the limit even when positives
    # below the cut were dropped, as they enter only beyond the limit.
    fpr[-1], pro[-1] = 1.0, (points.pro[-1] if points.pro.size else 0.0)
    crossing = int(np.searchsorted(fpr, fpr_limit, side="left"))  # first vertex with fpr >= limit
    x0, x1, y0, y1 = fpr[crossing - 1], fpr[crossing], pro[crossing - 1], pro[crossing]
    y_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    return (
        np.append(fpr[:crossing], fpr_limit),
        np.append(pro[:crossing], y_at_limit),
    )


def _pro_points(split: _PixelSplit, sorted_negatives: np.ndarray, cut: float = -math.inf) -> OperatingPoints:
    """Operating points with PRO; positives scoring below ``cut`` are left out (see ``_top_negatives``)."""
    scores, regions = split.positive_scores, split.positive_regions
    if cut > -math.inf:
        keep = scores >= cut
        scores, regions = scores[keep], regions[keep]
    return _operating_points(scores, sorted_negatives, split.negative_scores.size, regions, split.region_weights)


def pro_curve(maps, masks, fpr_limit: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve (FPR, PRO) from (0, 0) to FPR = ``fpr_limit``, for plots and AUPRO.

    Empty arrays if there is no anomalous region or no normal pixel.
    """
    _check_fpr_limit(fpr_limit)
    split = _split_pixels(maps, masks)
    if split.n_regions == 0 or split.negative_scores.size == 0:
        return np.zeros(0), np.zeros(0)
    points = _pro_points(split, *_top_negatives(split.negative_scores, fpr_limit))
    return _pro_curve_of(points, fpr_limit)


def _normalised_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    return float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2.0 / fpr_limit)


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD); nan if undefined.

    ``maps``: (N, H, W) anomaly scores; ``masks``: (N, H, W) ground truth (bool or 0/1).
    Regions are 8-connected components of each mask, all weighted equally over the
    dataset; FPR is global over all normal pixels.  1.0 for a perfect detector.
    """
    fpr, pro = pro_curve(maps, masks, fpr_limit)
    return _normalised_area(fpr, pro, fpr_limit) if fpr.size else float("nan")


def pixel_operating_points(maps, masks) -> tuple[OperatingPoints, int]:
    """Operating points of all pixels, with PRO, from a single sort; and the number of regions.

    What `pixel_scores` and the PR / PRO plots share, so a caller needing both sorts once.
    """
    split = _split_pixels(maps, masks)
    split.negative_scores.sort()  # in place: the array is private to this call
    return _pro_points(split, split.negative_scores), split.n_regions


def pixel_scores_from(points: OperatingPoints, n_regions: int, fpr_limit: float = 0.3) -> dict[str, float]:
    """`pixel_scores` from the result of `pixel_operating_points`."""
    _check_fpr_limit(fpr_limit)
    f1, f1_threshold = _best_f1_of(points)
    return {
        "auroc": _roc_auc_of(points),
        "aupro": _normalised_area(*pro_curve_from(points, n_regions, fpr_limit), fpr_limit)
        if n_regions > 0 and points.n_neg > 0
        else float("nan"),
        "ap": _average_precision_of(points),
        "f1": f1,
        "f1_threshold": f1_threshold,
    }


def pro_curve_from(points: OperatingPoints, n_regions: int, fpr_limit: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """`pro_curve` from the result of `pixel_operating_points` (empty arrays where undefined)."""
    _check_fpr_limit(fpr_limit)
    if n_regions == 0 or points.n_neg == 0:
        return np.zeros(0), np.zeros(0)
    return _pro_curve_of(points, fpr_limit)


def pixel_scores(maps, masks, fpr_limit: float = 0.3) -> dict[str, float]:
    """All pixel metrics from a single sort of the normal pixels.

    Keys: ``auroc``, ``aupro``, ``ap`` (average precision), ``f1``, ``f1_threshold``;
    nan where undefined.
    """
    _check_fpr_limit(fpr_limit)
    return pixel_scores_from(*pixel_operating_points(maps, masks), fpr_limit)
