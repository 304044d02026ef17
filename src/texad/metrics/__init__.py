"""Exact anomaly-detection metrics: pixel (AUROC, AUPRO, AP, F1), image, and clustering."""

from texad.metrics.clustering import (
    ClusteringMetrics,
    adjusted_rand_index,
    contingency_matrix,
    hungarian_f1,
    normalized_mutual_info,
)
from texad.metrics.functional import (
    OperatingPoints,
    aupro,
    average_precision,
    best_f1,
    label_regions,
    operating_points,
    pixel_scores,
    pro_curve,
    roc_auc,
)
from texad.metrics.image import ImageMetrics
from texad.metrics.pixel import PixelMetrics

from texad.metrics import functional as _functional

__all__ = [
    "PixelMetrics",
    "ImageMetrics",
    "ClusteringMetrics",
    *_functional.__all__,
    "contingency_matrix",
    "normalized_mutual_info",
    "adjusted_rand_index",
    "hungarian_f1",
]
