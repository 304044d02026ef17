"""Anomaly clustering: group anomalous images by defect type (README.md beside this file)."""

from texad.methods.clustering.lightning_model import AnomalyClustering

__all__ = ["AnomalyClustering"]
