"""Choosing Sp-CFA's fusion weights α and blur order on validation maps, without retraining.

Two blur orders (`BLUR_ORDERS`, `method.blur_order`): "after" (texad's first) blurs once after
fusion, S = blur(Σ_v α_v S_v) = Σ_v α_v blur(S_v), the blur being linear; "mosaic" (the paper's:
each view is a CFA map, blurred where CFA computes it) blurs each superpixel view's map in mosaic
coordinates before the inverse, S = α_org blur(S_org) + Σ_v α_v inverse_v(blur(M_v)), keeping
its edges on superpixel boundaries. Either way each view is blurred once and every grid point is
a weighted sum of pre-blurred maps. Pixel metrics depend only on the
ranking, so per point only the optimised metric is computed (one sort of the normal pixels, the
cost that dominates); the full metrics are computed once, at the best α, on the test maps.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from texad.data.superpixels import inverse_mosaic
from texad.errors import TexadError
from texad.metrics import functional as mf
from texad.metrics.aupimo import aupimo_per_image, pixel_aupimo
from texad.metrics.bootstrap import TestStatistics, collect_statistics, intervals
from texad.metrics.border import ring_ratio
from texad.metrics.offset import defect_alignment, offset_record
from texad.metrics.pixel import pixel_metric_record
from texad.methods.components.gaussian import gaussian_blur2d
from texad.methods.components.image_score import image_score

log = logging.getLogger(__name__)

VIEWS = ("org", "small", "big")
BLUR_ORDERS = ("after", "mosaic")
#: what metrics.json's `views` reports of each view alone (with their ci95)
VIEW_METRICS = ("pixel_auroc", "pixel_aupro", "pixel_aupr", "pixel_f1", "image_auroc")
PIXEL_METRICS = ("pixel_aupr", "pixel_f1", "pixel_auroc", "pixel_aupro")
IMAGE_METRICS = ("image_auroc", "image_f1")


def simplex_grid(n_views: int, step: float = 0.05) -> np.ndarray:
    """(P, n_views) weights ≥ 0 summing to 1, on a grid of `step` (1/step must be an integer)."""
    parts = round(1.0 / step)
    if parts < 1 or abs(parts * step - 1.0) > 1e-6:
        raise TexadError(f"fusion.step must divide 1 (e.g. 0.05, 0.1, 0.25), got {step}")
    points = [c for c in itertools.product(range(parts + 1), repeat=n_views - 1) if sum(c) <= parts]
    grid = np.array([[*c, parts - sum(c)] for c in points], dtype=np.float64) / parts
    return grid.reshape(-1, n_views)


def blur_views(maps: Mapping[str, torch.Tensor], sigma: float) -> dict[str, np.ndarray]:
    """Each (N,H,W) view map blurred once (float32 numpy)."""
    return {v: gaussian_blur2d(m.float(), sigma).numpy() for v, m in maps.items()}


def mosaic_blurred(mosaic_map: torch.Tensor, labels: torch.Tensor, sigma: float) -> torch.Tensor:
    """A superpixel view's (B,H,W) map in mosaic coordinates, blurred there, then mapped back to the image."""
    return inverse_mosaic(gaussian_blur2d(mosaic_map, sigma), labels)


def order_blurred(split: Mapping[str, Any], sigma: float, order: str) -> dict[str, np.ndarray]:
    """Each view's blurred map (float32 numpy, image coordinates) for one blur order.

    `split` is a `CFA.view_outputs` entry: `maps` (view → unsmoothed (N,H,W)) and, for "mosaic",
    `mosaic_blurred` (superpixel view → its map blurred in mosaic coordinates, then mapped back).
    """
    if order not in BLUR_ORDERS:
        raise TexadError(f"blur order must be one of {list(BLUR_ORDERS)} (method.blur_order / fusion.blur_orders), got {order!r}")
    maps = split["maps"]
    if order == "after":
        return blur_views(maps, sigma)
    pre = split.get("mosaic_blurred") or {}
    missing = [v for v in maps if v != "org" and v not in pre]
    if missing:
        raise TexadError(f"blur order 'mosaic' needs the views' mosaic-blurred maps; missing for {missing}")
    return {v: (blur_views({v: m}, sigma)[v] if v == "org" else pre[v].float().numpy()) for v, m in maps.items()}


def fuse_blurred(blurred: Mapping[str, np.ndarray], alpha: Mapping[str, float]) -> torch.Tensor:
    """Σ_v α_v · blur(S_v): the fused map at α of pre-blurred views, as a float32 tensor."""
    fused = sum(float(alpha.get(v, 0.0)) * x for v, x in blurred.items())
    return torch.from_numpy(np.ascontiguousarray(fused, dtype=np.float32))


class FusionObjective:
    """metric(α) on one split's blurred view maps, for α over the given views.

    The normal and anomalous pixels of every view are split once into (V, N) float32 arrays, so a
    point costs one matrix-vector product and one sort of the normal pixels (exact metric).
    `stride` > 1 scores every stride-th row and column only: a cheaper, approximate screen of the
    grid (the maps are blurred with σ≈4, so neighbours are nearly equal), refined exactly later.
    """

    def __init__(
        self,
        blurred: Mapping[str, np.ndarray],
        masks: torch.Tensor | None,
        labels: torch.Tensor | None,
        metric: str,
        stride: int = 1,
        image_rule: tuple[str, float] = ("max", 0.01),
    ) -> None:
        if metric not in PIXEL_METRICS + IMAGE_METRICS:
            raise TexadError(f"fusion.metric must be one of {list(PIXEL_METRICS + IMAGE_METRICS)}, got {metric!r}")
        self.views, self.metric = list(blurred), metric
        maps = np.stack([blurred[v][:, ::stride, ::stride] for v in self.views])  # (V,N,H,W)
        if metric in PIXEL_METRICS:
            if masks is None or not bool(masks.any()):
                raise TexadError(f"fusion.metric={metric} needs anomalous pixels in the validation masks")
            m = np.asarray(masks.numpy()[:, ::stride, ::stride], dtype=bool)
            flat = maps.reshape(len(self.views), -1)
            self.negatives = np.ascontiguousarray(flat[:, ~m.reshape(-1)])
            self.positives = np.ascontiguousarray(flat[:, m.reshape(-1)])
            if metric == "pixel_aupro":
                split = mf._split_pixels(maps[0], m)  # region ids follow the mask, not the scores
                self.regions, self.region_weights = split.positive_regions, split.region_weights
        else:
            if labels is None or len(torch.unique(labels)) < 2:
                raise TexadError(f"fusion.metric={metric} needs normal and anomalous validation images")
            self.maps, self.labels = maps, labels.numpy() > 0
            self.image_rule = image_rule

    def __call__(self, alpha: Sequence[float]) -> float:
        a = np.asarray(alpha, dtype=np.float32)
        if self.metric in IMAGE_METRICS:
            fused = torch.from_numpy(np.tensordot(a, self.maps, axes=1))
            scores = image_score(fused, *self.image_rule).numpy()
            return mf.roc_auc(scores, self.labels) if self.metric == "image_auroc" else mf.best_f1(scores, self.labels)[0]
        neg, pos = a @ self.negatives, a @ self.positives
        neg.sort()
        # texad.metrics.functional's exact operating points, fed with pre-split pixels
        if self.metric == "pixel_aupro":
            points = mf._operating_points(pos, neg, neg.size, self.regions, self.region_weights)
            return mf._normalised_area(*mf._pro_curve_of(points, 0.3), 0.3)
        points = mf._operating_points(pos, neg, neg.size)
        if self.metric == "pixel_aupr":
            return mf._average_precision_of(points)
        if self.metric == "pixel_f1":
            return mf._best_f1_of(points)[0]
        return mf._roc_auc_of(points)


@dataclass
class FusionResult:
    alpha: dict[str, float]  # best weights, by view name (inactive views 0)
    value: float  # the optimised metric at the best α on the search split
    metric: str
    n_points: int
    seconds: float
    table: list[tuple[list[float], float]] = field(default_factory=list)  # every (α, value), for plots
    views_alone: dict[str, dict[str, float | None]] = field(default_factory=dict)  # test metrics of each view alone
    blur_order: str = "after"
    by_order: dict[str, dict[str, Any]] = field(default_factory=dict)  # best α and value per blur order

    def as_record(self) -> dict[str, Any]:
        return {
            "alpha": [self.alpha.get(v, 0.0) for v in VIEWS],
            "blur_order": self.blur_order,
            "by_order": self.by_order,
            "val_metric": self.value,
            "metric": self.metric,
            "n_points": self.n_points,
            "seconds": round(self.seconds, 3),
            "test_views_alone": self.views_alone,
        }


def grid_search(
    blurred: Mapping[str, np.ndarray],
    masks: torch.Tensor | None,
    labels: torch.Tensor | None,
    metric: str = "pixel_aupr",
    step: float = 0.05,
    screen_stride: int = 1,
    refine_top: int = 5,
    image_rule: tuple[str, float] = ("max", 0.01),
) -> FusionResult:
    """Best α on the simplex over the views of `blurred`, by `metric` (first grid point wins ties).

    `screen_stride` 1: every point exact. > 1: every point on the subsampled pixels, then the
    `refine_top` best re-scored exactly; the reported value is always exact. `image_rule` is the
    method's image score (`texad.methods.components.image_score` rule and fraction), for the image metrics.
    """
    start = time.perf_counter()
    views = list(blurred)
    grid = simplex_grid(len(views), step)
    exact = FusionObjective(blurred, masks, labels, metric, image_rule=image_rule)
    if screen_stride > 1 and len(grid) > refine_top:
        screen = FusionObjective(blurred, masks, labels, metric, stride=screen_stride, image_rule=image_rule)
        screened = np.array([_finite(screen(g)) for g in grid])
        candidates = np.sort(np.argsort(-screened, kind="stable")[:refine_top])
    else:
        candidates = np.arange(len(grid))
    table = [(grid[i].tolist(), float(exact(grid[i]))) for i in candidates]
    best = int(np.argmax([_finite(v) for _, v in table]))
    return FusionResult(
        alpha={v: float(a) for v, a in zip(views, table[best][0])},
        value=table[best][1],
        metric=metric,
        n_points=len(grid),
        seconds=time.perf_counter() - start,
        table=table,
    )


def _finite(value: float) -> float:
    return value if np.isfinite(value) else -np.inf


def fused_metrics(
    blurred: Mapping[str, np.ndarray],
    masks: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: Mapping[str, float],
    image_rule: tuple[str, float] = ("max", 0.01),
    thresholds: Mapping[str, float | None] | None = None,
) -> dict[str, float | None]:
    """All pixel and image metrics of the fused map at α (the usual metrics.json keys, AUPIMO and the
    normal images' ring ratio included); the image score is the method's rule (`image_rule`:
    `texad.methods.components.image_score` rule and fraction). `thresholds` (`{"pixel": t, "image": t}`, validation's
    best-F1 thresholds) add `pixel_f1_at_val` / `image_f1_at_val`, as a test pass without re-fusion has."""
    fused_t = fuse_blurred(blurred, alpha)
    fused = fused_t.numpy()
    thresholds = thresholds or {}
    out: dict[str, float | None] = {}
    if masks is not None:
        mask_np = masks.numpy()
        out.update(pixel_metric_record(fused, mask_np))
        out["pixel_aupimo"] = pixel_aupimo(fused, mask_np)
        out.update(offset_record(defect_alignment(fused_t, masks.reshape(fused_t.shape))))
        if thresholds.get("pixel") is not None:
            out["pixel_f1_at_val"] = mf.f1_at_threshold(fused.ravel(), mask_np.ravel(), float(thresholds["pixel"]))
    if labels is not None and (labels >= 0).all():
        scores = image_score(fused_t, *image_rule).numpy()
        out.update(mf.image_scores(scores, labels.numpy()))
        if thresholds.get("image") is not None:
            out["image_f1_at_val"] = mf.f1_at_threshold(scores, labels.numpy(), float(thresholds["image"]))
        normal = (labels == 0).numpy()
        if normal.any() and min(fused_t.shape[-2:]) > 2:
            out["ring_ratio"] = ring_ratio(fused_t[torch.from_numpy(normal)])
    return {k: (None if v is None or not np.isfinite(v) else float(v)) for k, v in out.items()}


def refuse(
    outputs: Mapping[str, Mapping[str, Any]],
    blur_sigma: float,
    metric: str = "pixel_aupr",
    step: float = 0.05,
    screen_stride: int = 1,
    refine_top: int = 5,
    image_rule: tuple[str, float] = ("max", 0.01),
    blur_orders: Sequence[str] = ("after",),
) -> tuple[FusionResult, dict[str, float | None], dict[str, float | None]]:
    """Best α and blur order on the validation maps; then (result, validation metrics, test metrics) there.

    `outputs[split]` holds `maps` (view → (N,H,W) unsmoothed), `mosaic_blurred` (for the "mosaic"
    order), `masks` (N,H,W) bool or None, and `labels` (N,), as `CFA.view_outputs` collects them
    during validate / test. Each order in `blur_orders` gets its own α grid; the best validation
    value wins (the first order listed on ties). Orders that the views make identical (CFA alone)
    are searched once.
    """
    if "val" not in outputs or "test" not in outputs:
        raise TexadError("fusion search needs validation and test maps (is dataset.val_fraction > 0?)")
    val, test = outputs["val"], outputs["test"]
    views = [v for v in VIEWS if v in val["maps"]]
    orders = list(dict.fromkeys(blur_orders)) if len(views) > 1 or "org" not in views else ["after"]
    if not orders:
        raise TexadError("fusion.blur_orders must name at least one of " + str(list(BLUR_ORDERS)))
    best: FusionResult | None = None
    by_order = {}
    for order in orders:
        blurred = order_blurred({**val, "maps": {v: val["maps"][v] for v in views}}, blur_sigma, order)
        found = grid_search(blurred, val["masks"], val["labels"], metric, step, screen_stride, refine_top, image_rule)
        found.blur_order = order
        by_order[order] = {"alpha": [found.alpha.get(v, 0.0) for v in VIEWS], "val_metric": found.value}
        log.info("fusion (%s blur): best α %s, val %s %.4f over %d points (%.1fs)", order, found.alpha, metric,
                 found.value, found.n_points, found.seconds)
        if best is None or _finite(found.value) > _finite(best.value):
            best, val_blurred = found, blurred
    result = best
    result.by_order = by_order
    test_blurred = order_blurred(test, blur_sigma, result.blur_order)
    val_metrics = fused_metrics(val_blurred, val["masks"], val["labels"], result.alpha, image_rule)
    chosen = {"pixel": val_metrics.get("pixel_f1_threshold"), "image": val_metrics.get("image_f1_threshold")}
    test_metrics = fused_metrics(test_blurred, test["masks"], test["labels"], result.alpha, image_rule, chosen)
    # each view alone on test, for reporting beside the fused map (issue 19: does a view add anything?)
    result.views_alone = {
        v: {k: fused_metrics(test_blurred, test["masks"], test["labels"], {v: 1.0}, image_rule).get(k)
            for k in ("pixel_aupr", "pixel_f1", "pixel_aupro", "pixel_auroc", "image_auroc")}
        for v in views
    } if len(views) > 1 else {}
    if "paths" in test and (test["labels"] >= 0).all():
        stats = fused_statistics(test_blurred, test, result.alpha, image_rule, chosen)
        test_metrics["ci95"] = intervals(stats)
        test_metrics["statistics"] = stats
    return result, val_metrics, test_metrics


def view_records(split: Mapping[str, Any], blur_sigma: float, blur_order: str,
                 image_rule: tuple[str, float] = ("max", 0.01)) -> dict[str, dict[str, Any]]:
    """metrics.json's `views`: each view's map alone (blurred in `blur_order`), its `VIEW_METRICS`
    and, where the split has image labels, their bootstrap intervals under `ci95` (as the top level's)."""
    blurred = order_blurred(split, blur_sigma, blur_order)
    out: dict[str, dict[str, Any]] = {}
    for v in blurred:
        alone = {v: 1.0}
        values = fused_metrics(blurred, split["masks"], split["labels"], alone, image_rule)
        record: dict[str, Any] = {k: values.get(k) for k in VIEW_METRICS}
        if "paths" in split and split["labels"] is not None and (split["labels"] >= 0).all():
            stats = fused_statistics(blurred, split, alone, image_rule, {})
            ci = intervals(stats)
            record["ci95"] = {k: ci.get(k) for k in VIEW_METRICS if k in ci}
        out[v] = record
    return out


def fused_statistics(blurred: Mapping[str, np.ndarray], split: Mapping[str, Any], alpha: Mapping[str, float],
                     image_rule: tuple[str, float], thresholds: Mapping[str, float | None]) -> TestStatistics:
    """The bootstrap's per-image statistics (texad.metrics.bootstrap) of the fused maps at α."""
    fused = fuse_blurred(blurred, alpha)
    masks = split["masks"]
    aupimo = None if masks is None else aupimo_per_image(fused.numpy(), masks.numpy())
    return collect_statistics(image_score(fused, *image_rule), split["labels"], split["paths"],
                              split.get("types") or ["unknown"] * len(split["paths"]), fused,
                              None if masks is None else masks.reshape(fused.shape), aupimo, dict(thresholds))


def time_refusion(
    n_points: int = 100,
    n_images: int = 100,
    size: int = 256,
    n_views: int = 3,
    blur_sigma: float = 4.0,
    metric: str = "pixel_aupr",
    screen_stride: int = 2,
    refine_top: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Seconds to score `n_points` α points from cached maps of `n_images` images at size².

    The defaults are evaluate.py's (`fusion.screen_stride=2`, `refine_top=5`; `screen_stride=1`
    times the all-exact grid). Synthetic maps: noise, with square defects (≈1 % of pixels) scored
    higher. `setup_s` is the one-off blur of each view and the pixel split; `points_s` the grid
    itself, exact re-scoring of the best points included (the benchmark figure).
    """
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n_images, size, size, dtype=torch.bool)
    side = max(2, size // 7)
    for i in range(n_images // 2, n_images):
        y, x = torch.randint(0, size - side, (2,), generator=g).tolist()
        masks[i, y : y + side, x : x + side] = True
    maps = {
        v: torch.rand(n_images, size, size, generator=g) + masks.float() * (0.3 + 0.2 * k)
        for k, v in enumerate(VIEWS[:n_views])
    }
    start = time.perf_counter()
    blurred = blur_views(maps, blur_sigma)
    objective = FusionObjective(blurred, masks, None, metric, stride=screen_stride)
    exact = objective if screen_stride == 1 else FusionObjective(blurred, masks, None, metric)
    setup = time.perf_counter() - start
    grid = simplex_grid(n_views, 0.05)
    grid = np.concatenate([grid] * (n_points // len(grid) + 1))[:n_points]
    start = time.perf_counter()
    values = np.array([objective(alpha) for alpha in grid])
    if screen_stride > 1:
        for i in np.argsort(-values)[:refine_top]:
            exact(grid[i])
    points = time.perf_counter() - start
    return {
        "points_s": points, "per_point_s": points / n_points, "setup_s": setup, "n_points": n_points,
        "pixels": n_images * size * size, "screen_stride": screen_stride, "refine_top": refine_top,
    }



def refuse_method(method: Any, results: dict[str, Any], fusion_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """evaluate.py's `fusion.search=grid`: pick α on validation, put the metrics at that α in `results`.

    `results["val"]` / `results["test"]` are replaced by the metrics at the best α (so metrics.json's
    usual keys hold them); the returned record keeps the trained α's test metrics for comparison.
    """
    search = str(fusion_cfg.get("search"))
    if search != "grid":
        raise TexadError(f"fusion.search must be null or 'grid', got {search!r}")
    outputs = getattr(method, "view_outputs", None)
    if not outputs:
        raise TexadError("fusion.search needs a method that keeps per-view maps (cfa / spcfa)")
    orders = fusion_cfg.get("blur_orders") or [str(method.hparams.get("blur_order", "after"))]
    rule = (str(method.hparams.get("image_score", "max")), float(method.hparams.get("image_score_fraction", 0.01)))
    result, val, test = refuse(
        outputs,
        blur_sigma=float(method.hparams.blur_sigma),
        metric=str(fusion_cfg.get("metric", "pixel_aupr")),
        step=float(fusion_cfg.get("step", 0.05)),
        screen_stride=int(fusion_cfg.get("screen_stride", 1)),
        refine_top=int(fusion_cfg.get("refine_top", 5)),
        image_rule=rule,
        blur_orders=[str(o) for o in orders],
    )
    record = result.as_record()
    record["trained_alpha"] = [float(a) for a in method.hparams.alpha]
    record["trained_blur_order"] = str(method.hparams.get("blur_order", "after"))
    record["test_at_trained_alpha"] = {k: v for k, v in results["test"].items() if k != "ci95"}
    method.test_statistics = test.pop("statistics", None)
    if len(outputs["test"]["maps"]) > 1:  # each view alone at the chosen blur order (α does not change them)
        for name, split in (("val", val), ("test", test)):
            split["views"] = view_records(outputs[name], float(method.hparams.blur_sigma), result.blur_order, rule)
            split["blur_order"] = result.blur_order
    # the re-fused image scores use the method's own rule; the rule chosen on validation belongs to the
    # trained α (kept under test_at_trained_alpha): say which rule each figure used
    refused_rule = {"rule": "official", "setting": "official", "image_score": list(rule),
                    "note": "alpha re-fusion scores images with method.image_score; the validation-chosen "
                            "rule (method.image_rule) is not re-chosen for the re-fused maps"}
    for split in (val, test):
        split["image_score"] = refused_rule
    results["val"], results["test"] = val, test
    return record


__all__ = [
    "BLUR_ORDERS", "FusionObjective", "FusionResult", "blur_views", "mosaic_blurred", "order_blurred", "view_records", "fuse_blurred", "fused_metrics", "grid_search", "refuse", "refuse_method",
    "simplex_grid",
    "time_refusion",
]
