"""Anomaly clustering: group anomalous images by defect type (Ardelean & Weyrich, CVPRW 2024)."""

from texad.methods.clustering.lightning_model import AnomalyClustering

__all__ = ["AnomalyClustering"]
