"""95 % intervals of test metrics: a seeded, stratified bootstrap over test images, and paired differences.

A replicate draws the normal and the defective test images separately with replacement (as many of
each as there are), so every replicate keeps the test set's class balance; pixel metrics take the
drawn images whole (their pixels are not independent). The interval is the 2.5–97.5 % percentile
range of `N_REPLICATES` replicates drawn with a fixed seed, so a run's intervals are reproducible and
two runs on the same test set are resampled identically (`paired_differences`).

What each replicate recomputes, from per-image statistics kept in `TestStatistics` (also written to
`<run dir>/test_statistics.npz`, which `texad.tools.compare` reads for paired comparisons):

* image AUROC, best F1, F1 at validation's threshold, per-type AUROC: exactly, from the image scores;
* pixel AUROC, AP, best F1, F1 at validation's threshold and AUPRO: from per-image (and per-region)
  histograms of the pixel scores over ~2 000 score bins (quantiles of the normal and of the anomalous
  pixels, and validation's threshold as an edge). A bin acts as a tie, so a replicate's value is the
  exact metric of slightly coarsened scores; on all images (weights 1) it differs from the exact point
  estimate by < 0.002 on the embedded sets (tested); the point estimates in metrics.json stay exact;
* pixel AUPIMO: the mean of the per-image AUPIMO values of the drawn defective images. (Each value
  depends on the normal images through its FPR range; that dependence is held at the full set's.)
* ring ratio (normal images) and map offset (defective images): from per-image sums, as the metric.

Intervals say how much a number could move with another draw of test images from the same source;
they say nothing about seeds (the results table shows the seed spread beside them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr

from texad.errors import TexadError
from texad.metrics.border import ring_sums
from texad.metrics.functional import label_regions
from texad.metrics.offset import defect_alignment, pooled_offset
from texad.outputs import atomic_write

__all__ = [
    "LEVEL", "N_REPLICATES", "STATISTICS_FILE", "TestStatistics", "collect_statistics", "group_intervals", "intervals",
    "metric_replicates", "paired_differences", "rank_correlation_interval", "replicate_weights",
]

N_REPLICATES = 1000
LEVEL = 0.95
SEED = 0
#: score quantiles per class that become bin edges (normal pixels: finer in their top half, where FPR <= 0.3)
POSITIVE_QUANTILES = 1024
NEGATIVE_QUANTILES = 1024
AUPRO_FPR_LIMIT = 0.3
STATISTICS_FILE = "test_statistics.npz"


@dataclass
class TestStatistics:
    """Per-image sufficient statistics of one run's test set (N images, B score bins, R regions)."""

    paths: list[str]
    labels: np.ndarray  # (N,) 0 normal / 1 defective
    defect_types: list[str]
    scores: np.ndarray  # (N,) image scores
    thresholds: dict[str, float | None] = field(default_factory=dict)  # validation's best-F1 thresholds
    edges: np.ndarray | None = None  # (B,) ascending bin edges; bin b holds scores in [edges[b], edges[b+1])
    positive: np.ndarray | None = None  # (N, B) anomalous pixels per bin
    negative: np.ndarray | None = None  # (N, B) normal pixels per bin
    region_image: np.ndarray | None = None  # (R,) image of each ground-truth region
    regions: np.ndarray | None = None  # (R, B) pixels of each region per bin
    aupimo: np.ndarray | None = None  # (N,) per-image AUPIMO (nan for normal images)
    ring: np.ndarray | None = None  # (N, 4) ring sums of normal images (zeros for defective)
    alignment: np.ndarray | None = None  # (N, K) map/mask alignment scores of defective images (zeros else)

    @property
    def has_pixels(self) -> bool:
        return self.edges is not None

    def save(self, path: str | Path) -> Path:
        arrays = {f.name: getattr(self, f.name) for f in fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        meta = {"paths": self.paths, "defect_types": self.defect_types, "thresholds": self.thresholds}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, meta=np.array(json.dumps(meta)), **arrays)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> "TestStatistics":
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {k: data[k] for k in data.files if k != "meta"}
        except (OSError, ValueError, KeyError) as err:
            raise TexadError(f"cannot read test statistics {str(path)!r} ({err}); run evaluate.py on the run "
                             "again to write them") from err
        return cls(paths=meta["paths"], defect_types=meta["defect_types"], thresholds=meta["thresholds"], **arrays)

    def reordered(self, order: np.ndarray) -> "TestStatistics":
        """The same statistics with images in `order` (regions follow their images)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("paths", "defect_types"):
                out[f.name] = [v[i] for i in order]
            elif f.name in ("thresholds", "edges", "regions"):
                out[f.name] = v
            elif f.name == "region_image":
                out[f.name] = None if v is None else np.argsort(order)[v]
            else:
                out[f.name] = None if v is None else v[order]
        return TestStatistics(**out)


def _bin_edges(maps: np.ndarray, masks: np.ndarray, thresholds: Sequence[float | None]) -> np.ndarray:
    pos, neg = maps[masks], maps[~masks]
    parts = [np.array([-np.inf])]
    if pos.size:
        parts.append(np.quantile(pos, np.linspace(0, 1, POSITIVE_QUANTILES)))
    if neg.size:
        levels = np.concatenate([np.linspace(0, 0.5, NEGATIVE_QUANTILES // 8, endpoint=False),
                                 np.linspace(0.5, 1, NEGATIVE_QUANTILES - NEGATIVE_QUANTILES // 8)])
        parts.append(np.quantile(neg, levels))
    parts.append(np.array([t for t in thresholds if t is not None and np.isfinite(t)], dtype=np.float64))
    return np.unique(np.concatenate(parts).astype(np.float64))


def _per_image_counts(bins: np.ndarray, select: np.ndarray, n_bins: int) -> np.ndarray:
    """(N, B) counts of the selected pixels of each image per bin."""
    n = bins.shape[0]
    image = np.broadcast_to(np.arange(n).reshape((n,) + (1,) * (bins.ndim - 1)), bins.shape)
    flat = image[select].astype(np.int64) * n_bins + bins[select]
    return np.bincount(flat, minlength=n * n_bins).reshape(n, n_bins).astype(np.int32)


def collect_statistics(scores: torch.Tensor, labels: torch.Tensor, paths: Sequence[str], defect_types: Sequence[str],
                       maps: torch.Tensor | None = None, masks: torch.Tensor | None = None,
                       aupimo: np.ndarray | None = None,
                       thresholds: dict[str, float | None] | None = None) -> TestStatistics:
    """Statistics of one test pass: image scores and labels, and with maps and masks (N, H, W) the pixels'."""
    labels_np = np.asarray(labels, dtype=np.int64).reshape(-1)
    stats = TestStatistics(paths=[str(p) for p in paths], labels=labels_np, defect_types=[str(t) for t in defect_types],
                           scores=np.asarray(scores, dtype=np.float64).reshape(-1), thresholds=dict(thresholds or {}))
    if len(stats.paths) != labels_np.size or stats.scores.size != labels_np.size:
        raise TexadError(f"test statistics: {len(stats.paths)} paths, {stats.scores.size} scores and "
                         f"{labels_np.size} labels do not match")
    if maps is None or masks is None:
        return stats
    m = maps.detach().cpu().float().numpy()
    k = (masks.detach().cpu().numpy() > 0.5)
    if m.shape[0] != labels_np.size:
        raise TexadError(f"test statistics: {m.shape[0]} maps for {labels_np.size} images")
    stats.edges = _bin_edges(m, k, [stats.thresholds.get("pixel")])
    n_bins = stats.edges.size
    bins = np.clip(np.searchsorted(stats.edges, m, side="right") - 1, 0, n_bins - 1)
    stats.positive = _per_image_counts(bins, k, n_bins)
    stats.negative = _per_image_counts(bins, ~k, n_bins)
    regions, n_regions = label_regions(k)
    flat_regions, flat_bins = regions.reshape(-1), bins.reshape(-1)
    inside = flat_regions > 0
    stats.regions = np.bincount((flat_regions[inside] - 1).astype(np.int64) * n_bins + flat_bins[inside],
                                minlength=n_regions * n_bins).reshape(n_regions, n_bins).astype(np.int32)
    first = np.zeros(n_regions, dtype=np.int64)
    image_of_pixel = np.broadcast_to(np.arange(m.shape[0])[:, None, None], regions.shape).reshape(-1)
    first[flat_regions[inside] - 1] = image_of_pixel[inside]
    stats.region_image = first
    stats.aupimo = None if aupimo is None else np.asarray(aupimo, dtype=np.float64).reshape(-1)
    maps_t, masks_t = torch.from_numpy(m), torch.from_numpy(k.astype(np.float32))
    normal = labels_np == 0
    stats.ring = np.zeros((labels_np.size, 4))
    if normal.any() and min(m.shape[-2:]) > 2:
        stats.ring[normal] = np.stack([ring_sums(maps_t[i:i + 1]).numpy() for i in np.flatnonzero(normal)])
    rows = [defect_alignment(maps_t[i:i + 1], masks_t[i:i + 1]).numpy() for i in range(labels_np.size)]
    stats.alignment = np.stack(rows).astype(np.float32)
    return stats


def replicate_weights(labels: np.ndarray, n: int = N_REPLICATES, seed: int = SEED) -> np.ndarray:
    """(n, N) how often each image is drawn per replicate: normals and defective images separately."""
    rng = np.random.default_rng(seed)
    weights = np.zeros((n, labels.size), dtype=np.float64)
    for value in (0, 1):
        members = np.flatnonzero(labels == value)
        if members.size == 0:
            continue
        draws = rng.integers(0, members.size, size=(n, members.size))
        counts = np.zeros((n, members.size))
        np.add.at(counts, (np.arange(n)[:, None], draws), 1.0)
        weights[:, members] = counts
    return weights


# --- metrics of weighted image sets (one row of weights = one replicate) ------------------------


def _image_metrics(scores: np.ndarray, labels: np.ndarray, w: np.ndarray, threshold: float | None) -> dict[str, np.ndarray]:
    """Image AUROC, best F1 and F1 at `threshold` for each row of weights (R, N): exact, ties as halves."""
    order = np.argsort(-scores, kind="stable")
    s, y, w = scores[order], labels[order] == 1, w[:, order]
    pos, neg = w * y, w * ~y
    ends = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)  # last index of each tie run
    tp, fp = np.cumsum(pos, 1)[:, ends], np.cumsum(neg, 1)[:, ends]
    n_pos, n_neg = tp[:, -1:], fp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = tp / n_pos, fp / n_neg
        zeros = np.zeros((w.shape[0], 1))
        auroc = np.sum(np.diff(np.hstack([zeros, fpr]), axis=1) * (np.hstack([zeros, tpr])[:, :-1] + tpr) / 2, 1)
        f1 = np.max(2 * tp / (tp + fp + n_pos), 1)
        out = {"image_auroc": auroc, "image_f1": f1}
        if threshold is not None and np.isfinite(threshold):
            above = s >= threshold
            tp_t, fp_t = pos[:, above].sum(1), neg[:, above].sum(1)
            out["image_f1_at_val"] = 2 * tp_t / (tp_t + fp_t + n_pos[:, 0])
    bad = (n_pos[:, 0] == 0) | (n_neg[:, 0] == 0)
    for v in out.values():
        v[bad] = np.nan
    return out


def _pixel_metrics(stats: TestStatistics, w: np.ndarray) -> dict[str, np.ndarray]:
    """Pixel AUROC, AP, best F1, F1 at validation's threshold and AUPRO per row of weights, from the bins."""
    # counts at or above each edge, from the top bin down
    tp = np.cumsum((w @ stats.positive)[:, ::-1], 1)
    fp = np.cumsum((w @ stats.negative)[:, ::-1], 1)
    n_pos, n_neg = tp[:, -1:], fp[:, -1:]
    zeros = np.zeros((w.shape[0], 1))
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = tp / n_pos, fp / n_neg
        out["pixel_auroc"] = np.sum(np.diff(np.hstack([zeros, fpr]), 1) * (np.hstack([zeros, tpr])[:, :-1] + tpr) / 2, 1)
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
        out["pixel_aupr"] = np.sum(np.diff(np.hstack([zeros, tp]), 1) / n_pos * precision, 1)
        out["pixel_f1"] = np.max(2 * tp / (tp + fp + n_pos), 1)
        t = stats.thresholds.get("pixel")
        if t is not None and np.isfinite(t):
            at = int(np.flatnonzero(stats.edges[::-1] == t)[0])  # an edge: exact counts at t
            out["pixel_f1_at_val"] = 2 * tp[:, at] / (tp[:, at] + fp[:, at] + n_pos[:, 0])
        out["pixel_aupro"] = _aupro(stats, w, fpr)
    bad = (n_pos[:, 0] == 0) | (n_neg[:, 0] == 0)
    for v in out.values():
        v[bad] = np.nan
    return out


def _aupro(stats: TestStatistics, w: np.ndarray, fpr: np.ndarray) -> np.ndarray:
    """MVTec AUPRO up to FPR 0.3 (PRO interpolated there, divided by 0.3) per row of weights."""
    if stats.regions.shape[0] == 0:
        return np.full(w.shape[0], np.nan)
    sizes = stats.regions.sum(1).astype(np.float64)
    overlap = np.cumsum(stats.regions[:, ::-1], 1) / sizes[:, None]  # (R, B): share of region above t
    region_w = w[:, stats.region_image]  # (Rep, R)
    with np.errstate(invalid="ignore", divide="ignore"):
        pro = (region_w @ overlap) / region_w.sum(1, keepdims=True)
    out = np.empty(w.shape[0])
    for r in range(w.shape[0]):
        x, y = np.concatenate([[0.0], fpr[r]]), np.concatenate([[0.0], pro[r]])
        keep = x <= AUPRO_FPR_LIMIT
        xs, ys = x[keep], y[keep]
        if xs[-1] < AUPRO_FPR_LIMIT and keep.sum() < x.size:
            nxt = int(np.argmax(~keep))
            frac = (AUPRO_FPR_LIMIT - x[nxt - 1]) / (x[nxt] - x[nxt - 1])
            xs, ys = np.append(xs, AUPRO_FPR_LIMIT), np.append(ys, y[nxt - 1] + frac * (y[nxt] - y[nxt - 1]))
        out[r] = np.trapezoid(ys, xs) / AUPRO_FPR_LIMIT if hasattr(np, "trapezoid") else np.trapz(ys, xs) / AUPRO_FPR_LIMIT
    return out


def metric_replicates(stats: TestStatistics, weights: np.ndarray, pixel_only: bool = False) -> dict[str, np.ndarray]:
    """Every test metric of `stats` for each row of `weights` (R, N): what a bootstrap replicate measures.
    `pixel_only`: AUROC, AP, F1 and AUPRO of the pixels alone (e.g. for a rank correlation over settings)."""
    labels = stats.labels
    if pixel_only:
        return _pixel_metrics(stats, weights) if stats.has_pixels else {}
    out = _image_metrics(stats.scores, labels, weights, stats.thresholds.get("image"))
    for kind in sorted({t for t, y in zip(stats.defect_types, labels) if y == 1}):
        keep = (labels == 0) | np.array([t == kind for t in stats.defect_types])
        out[f"image_auroc_per_type/{kind}"] = _image_metrics(stats.scores[keep], labels[keep], weights[:, keep],
                                                              None)["image_auroc"]
    if not stats.has_pixels:
        return out
    out.update(_pixel_metrics(stats, weights))
    if stats.aupimo is not None:
        finite = np.isfinite(stats.aupimo)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["pixel_aupimo"] = (weights[:, finite] @ stats.aupimo[finite]) / weights[:, finite].sum(1)
    if stats.ring is not None and (labels == 0).any():
        border_sum, border_n, inner_sum, inner_n = (weights @ stats.ring).T
        with np.errstate(invalid="ignore", divide="ignore"):
            out["ring_ratio"] = (border_sum / border_n) / (inner_sum / inner_n)
    if stats.alignment is not None and (labels == 1).any():
        summed = weights @ stats.alignment.astype(np.float64)  # (R, 1 + K): valid count, then scores
        side = int(round((summed.shape[1] - 1) ** 0.5))
        offsets = np.array([pooled_offset(torch.from_numpy(row[1:].reshape(side, side))) if row[0] > 0
                            else [np.nan, np.nan] for row in summed])
        out["map_offset_dy"], out["map_offset_dx"] = offsets[:, 0], offsets[:, 1]
    return out


def intervals(stats: TestStatistics, n: int = N_REPLICATES, seed: int = SEED, level: float = LEVEL) -> dict[str, Any]:
    """{metric: [low, high]} percentile intervals; per-type AUROC under `image_auroc_per_type`."""
    return group_intervals([stats], n, seed, level)


def _percentiles(values: np.ndarray, level: float) -> list[float] | None:
    finite = values[np.isfinite(values)]
    if finite.size < 0.5 * values.size:
        return None
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))]


def _aligned(groups: Sequence[Sequence[TestStatistics]]) -> list[list[TestStatistics]]:
    """Every run's statistics in one image order (by path); all runs must hold the same test images."""
    reference = sorted(groups[0][0].paths)
    out = []
    for group in groups:
        row = []
        for stats in group:
            if sorted(stats.paths) != reference:
                raise TexadError("paired comparison needs runs on the same test images; these differ "
                                 f"({len(stats.paths)} vs {len(reference)} images, or other paths)")
            index = {p: i for i, p in enumerate(stats.paths)}
            row.append(stats.reordered(np.array([index[p] for p in reference])))
        out.append(row)
    return out


def group_intervals(group: Sequence[TestStatistics], n: int = N_REPLICATES, seed: int = SEED,
                    level: float = LEVEL) -> dict[str, Any]:
    """`intervals` of the mean over a group of runs on one test set (e.g. a method's seeds): every run is
    resampled with the same replicate weights, so the interval is the test set's, not the seeds' spread."""
    runs = _aligned([list(group)])[0]
    weights = replicate_weights(runs[0].labels, n, seed)
    per_run = [metric_replicates(s, weights) for s in runs]
    keys = set.intersection(*(set(r) for r in per_run))
    out: dict[str, Any] = {}
    for key in sorted(keys):
        interval = _percentiles(np.mean([r[key] for r in per_run], axis=0), level)
        if key.startswith("image_auroc_per_type/"):
            out.setdefault("image_auroc_per_type", {})[key.split("/", 1)[1]] = interval
        else:
            out[key] = interval
    return out


def rank_correlation_interval(pairs: Sequence[tuple[TestStatistics, TestStatistics]], metric: str,
                              n: int = 500, seed: int = SEED, level: float = LEVEL) -> list[float] | None:
    """95 % interval of Spearman's ρ between a metric on validation and on test over settings.

    `pairs` holds (validation, test) statistics per setting, all of one validation and one test set;
    each replicate resamples both sets' images (each stratified, the same draw for every setting) and
    recomputes every setting's two values, then ρ over the settings.
    """
    if len(pairs) < 3:
        return None
    val_w = replicate_weights(pairs[0][0].labels, n, seed)
    test_w = replicate_weights(pairs[0][1].labels, n, seed + 1)
    val = np.stack([metric_replicates(v, val_w, pixel_only=True)[metric] for v, _ in pairs], 1)  # (R, settings)
    test = np.stack([metric_replicates(t, test_w, pixel_only=True)[metric] for _, t in pairs], 1)
    rhos = np.array([spearmanr(a, b).statistic if np.ptp(a) > 0 and np.ptp(b) > 0 else np.nan
                     for a, b in zip(val, test)])
    return _percentiles(rhos, level)


def paired_differences(group_a: Sequence[TestStatistics], group_b: Sequence[TestStatistics],
                       n: int = N_REPLICATES, seed: int = SEED, level: float = LEVEL) -> dict[str, dict[str, Any]]:
    """Per metric: A − B of the seed means, on all images and over replicates drawn once for both groups.

    Returns {metric: {"a", "b", "difference", "low", "high", "excludes_zero"}}.
    """
    a, b = _aligned([list(group_a), list(group_b)])
    labels = a[0].labels
    if any(not np.array_equal(s.labels, labels) for s in a + b):
        raise TexadError("paired comparison: the runs label the same test images differently")
    weights = replicate_weights(labels, n, seed)
    ones = np.ones((1, labels.size))

    def mean_over(group, w):
        per_run = [metric_replicates(s, w) for s in group]
        keys = set.intersection(*(set(r) for r in per_run))
        return {k: np.mean([r[k] for r in per_run], axis=0) for k in keys}

    full_a, full_b = mean_over(a, ones), mean_over(b, ones)
    rep_a, rep_b = mean_over(a, weights), mean_over(b, weights)
    out = {}
    for key in sorted(set(full_a) & set(full_b)):
        diff = rep_a[key] - rep_b[key]
        interval = _percentiles(diff, level)
        point = float(full_a[key][0] - full_b[key][0])
        out[key] = {
            "a": float(full_a[key][0]), "b": float(full_b[key][0]), "difference": point,
            "low": None if interval is None else interval[0], "high": None if interval is None else interval[1],
            "excludes_zero": None if interval is None else bool(interval[0] > 0 or interval[1] < 0),
        }
    return out
