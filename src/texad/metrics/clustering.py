"""Anomaly clustering metrics: NMI, ARI and Hungarian-matched F1 of cluster ids vs defect classes.

All three are functions of the contingency matrix (clusters x classes), computed here in
float64 with numpy so the values match scikit-learn exactly and do not depend on the
installed torchmetrics version.  Label values are arbitrary integers (only equality matters).

``cluster_f1`` is the micro F1 after the best one-to-one matching of clusters to
classes, which equals the accuracy after matching, as in the official BlindLCA code;
``cluster_f1_macro`` averages the per-class F1 of the same matching.

``paired_clustering_differences`` gives 95 % intervals of A − B (e.g. with vs without the head) by the
measurement issue's bootstrap: images drawn with replacement *within each true type* (so every
replicate keeps the type sizes), the same draws for A and B and for every seed, and each replicate
rescoring the fixed cluster assignments on the drawn images. It says how much a score could move with
another draw of test images of the same types; it does not re-run the clustering.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import comb
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from texad.errors import TexadError

__all__ = ["contingency_matrix", "normalized_mutual_info", "adjusted_rand_index", "hungarian_f1", "ClusteringMetrics",
           "CLUSTER_SCORES", "cluster_scores", "stratified_draws", "paired_clustering_differences"]


def _labels(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1)


def contingency_matrix(pred, target) -> np.ndarray:
    """int64 counts[cluster, class] over the distinct cluster ids and class ids (sorted)."""
    pred, target = _labels(pred), _labels(target)
    if pred.size != target.size:
        raise TexadError(f"got {pred.size} cluster ids but {target.size} targets")
    _, cluster = np.unique(pred, return_inverse=True)
    _, cls = np.unique(target, return_inverse=True)
    counts = np.zeros((cluster.max(initial=-1) + 1, cls.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(counts, (cluster, cls), 1)
    return counts


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


def normalized_mutual_info(pred, target) -> float:
    """NMI with arithmetic-mean normalisation (sklearn's default); 1.0 when both are one cluster."""
    counts = contingency_matrix(pred, target)
    n = counts.sum()
    if n == 0:
        return float("nan")
    if counts.shape[0] == counts.shape[1] == 1:
        return 1.0
    nonzero = counts > 0
    joint = counts[nonzero] / n
    outer = np.outer(counts.sum(1), counts.sum(0))[nonzero] / float(n) ** 2
    mutual_info = float(np.sum(joint * np.log(joint / outer)))
    if mutual_info <= 0.0:  # independent labelings (also guards tiny negative rounding)
        return 0.0
    return mutual_info / ((_entropy(counts.sum(1)) + _entropy(counts.sum(0))) / 2.0)


def adjusted_rand_index(pred, target) -> float:
    """ARI (Hubert & Arabie), as sklearn: 1.0 for identical partitions, ~0 for random ones."""
    counts = contingency_matrix(pred, target)
    n = int(counts.sum())
    if n == 0:
        return float("nan")
    pairs_both = comb(counts, 2).sum()
    pairs_pred = comb(counts.sum(1), 2).sum()
    pairs_target = comb(counts.sum(0), 2).sum()
    pairs_all = comb(n, 2)
    expected = pairs_pred * pairs_target / pairs_all if pairs_all else 0.0
    maximum = (pairs_pred + pairs_target) / 2.0
    if maximum == expected:  # a single cluster on both sides, or all singletons
        return 1.0
    return float((pairs_both - expected) / (maximum - expected))


def hungarian_f1(pred, target, average: str = "micro") -> float:
    """F1 after the one-to-one cluster->class matching that maximises agreement.

    Clusters and classes may differ in number; samples of an unmatched cluster count as
    wrong.  ``micro``: correctly matched samples / all samples (= accuracy after
    matching).  ``macro``: mean over classes present in ``target`` of
    2 TP / (|matched cluster| + |class|).
    """
    if average not in ("micro", "macro"):
        raise TexadError(f"average must be 'micro' or 'macro', got {average!r}")
    counts = contingency_matrix(pred, target)
    n = counts.sum()
    if n == 0:
        return float("nan")
    clusters, classes = linear_sum_assignment(counts, maximize=True)
    true_positives = counts[clusters, classes]
    if average == "micro":
        return float(true_positives.sum() / n)
    class_f1 = np.zeros(counts.shape[1])  # an unmatched class has F1 = 0
    class_f1[classes] = 2.0 * true_positives / (counts.sum(1)[clusters] + counts.sum(0)[classes])
    return float(class_f1.mean())


class ClusteringMetrics(Metric):
    """NMI, ARI and Hungarian F1 (micro = BlindLCA's, and macro) over all updates.

    ``compute()`` returns python floats under ``nmi``, ``ari``, ``cluster_f1`` and
    ``cluster_f1_macro``; nan if nothing was seen.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("pred_clusters", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, pred_cluster: torch.Tensor, target: torch.Tensor) -> None:
        """Store one batch of integer cluster ids (B,) and integer class ids (B,)."""
        pred_cluster, target = pred_cluster.reshape(-1), target.reshape(-1)
        if pred_cluster.numel() != target.numel():
            raise TexadError(f"got {pred_cluster.numel()} cluster ids but {target.numel()} targets")
        self.pred_clusters.append(pred_cluster.detach().to("cpu", torch.int64))
        self.targets.append(target.detach().to("cpu", torch.int64))

    def compute(self) -> dict[str, float]:
        if isinstance(self.pred_clusters, list) and not self.pred_clusters:
            return dict.fromkeys(("nmi", "ari", "cluster_f1", "cluster_f1_macro"), float("nan"))
        pred, target = dim_zero_cat(self.pred_clusters).cpu(), dim_zero_cat(self.targets).cpu()
        return {
            "nmi": normalized_mutual_info(pred, target),
            "ari": adjusted_rand_index(pred, target),
            "cluster_f1": hungarian_f1(pred, target, "micro"),
            "cluster_f1_macro": hungarian_f1(pred, target, "macro"),
        }


CLUSTER_SCORES = {"nmi": normalized_mutual_info, "ari": adjusted_rand_index, "cluster_f1": hungarian_f1}


def cluster_scores(pred, target) -> dict[str, float]:
    """NMI, ARI and (micro) cluster F1 of one assignment."""
    return {name: float(fn(pred, target)) for name, fn in CLUSTER_SCORES.items()}


def stratified_draws(target, n: int = 1000, seed: int = 0) -> np.ndarray:
    """(n, N) image indices per replicate, drawn with replacement within each true type."""
    target = _labels(target)
    rng = np.random.default_rng(seed)
    draws = np.zeros((n, target.size), dtype=np.int64)
    for value in np.unique(target):
        members = np.flatnonzero(target == value)
        draws[:, members] = members[rng.integers(0, members.size, size=(n, members.size))]
    return draws


def paired_clustering_differences(runs_a, runs_b, target, n: int = 1000, seed: int = 0,
                                  level: float = 0.95) -> dict[str, dict]:
    """Per score: mean over runs of A and of B, A − B and its percentile interval over paired replicates.

    ``runs_a`` / ``runs_b``: cluster ids (N,) per run (e.g. per seed), all of the same N images in the
    order of ``target``. Returns {score: {"a", "b", "difference", "low", "high", "excludes_zero"}}.
    """
    target = _labels(target)
    runs_a, runs_b = [_labels(r) for r in runs_a], [_labels(r) for r in runs_b]
    if not runs_a or not runs_b or any(r.size != target.size for r in runs_a + runs_b):
        raise TexadError(f"paired clustering differences need cluster ids of all {target.size} images in every run")
    draws = stratified_draws(target, n, seed)
    tail = (1 - level) / 2 * 100
    out = {}
    for name, fn in CLUSTER_SCORES.items():
        def mean_score(runs, idx=None):
            return float(np.mean([fn(r if idx is None else r[idx], target if idx is None else target[idx]) for r in runs]))

        diffs = np.array([mean_score(runs_a, idx) - mean_score(runs_b, idx) for idx in draws])
        a, b = mean_score(runs_a), mean_score(runs_b)
        low, high = float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail))
        out[name] = {"a": a, "b": b, "difference": a - b, "low": low, "high": high,
                     "excludes_zero": bool(low > 0 or high < 0)}
    return out
