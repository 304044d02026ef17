"""Clustering metrics: Hungarian F1 against exhaustive matching, NMI/ARI against scikit-learn."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from texad.errors import TexadError
from texad.metrics import ClusteringMetrics, adjusted_rand_index, hungarian_f1, normalized_mutual_info


def all_one_to_one_matchings(n_clusters: int, n_classes: int):
    """Every maximal injective cluster->class matching, as lists of (cluster, class) pairs."""
    if n_clusters <= n_classes:
        for classes in itertools.permutations(range(n_classes), n_clusters):
            yield list(zip(range(n_clusters), classes))
    else:
        for clusters in itertools.permutations(range(n_clusters), n_classes):
            yield list(zip(clusters, range(n_classes)))


def brute_force_f1(pred: np.ndarray, target: np.ndarray) -> tuple[float, set[float]]:
    """Best micro F1 (accuracy) over all matchings, and the macro F1 of every best matching."""
    clusters, classes = np.unique(pred), np.unique(target)
    best_correct, macro_of_best = -1, set()
    for matching in all_one_to_one_matchings(len(clusters), len(classes)):
        predicted_class = np.full(pred.shape, -1)
        for k, c in matching:
            predicted_class[pred == clusters[k]] = c
        true_class = np.searchsorted(classes, target)
        correct = int(np.sum(predicted_class == true_class))
        per_class = []
        for c in range(len(classes)):
            tp = np.sum((predicted_class == c) & (true_class == c))
            per_class.append(2 * tp / (np.sum(predicted_class == c) + np.sum(true_class == c)))
        macro = round(float(np.mean(per_class)), 12)
        if correct > best_correct:
            best_correct, macro_of_best = correct, {macro}
        elif correct == best_correct:
            macro_of_best.add(macro)
    return best_correct / len(pred), macro_of_best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("n_clusters,n_classes", [(3, 3), (5, 3), (2, 4), (4, 4)])
def test_hungarian_f1_matches_exhaustive_search(seed, n_clusters, n_classes):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, n_classes, 40)
    # Clusters correlated with classes, plus noise; ids deliberately not 0..k-1.
    pred = np.where(rng.random(40) < 0.6, target % n_clusters, rng.integers(0, n_clusters, 40)) * 7 - 3
    micro, macros = brute_force_f1(pred, target)
    assert hungarian_f1(pred, target) == pytest.approx(micro, abs=1e-12)
    assert round(hungarian_f1(torch.from_numpy(pred), torch.from_numpy(target), "macro"), 12) in macros


def test_hungarian_f1_unmatched_clusters_count_as_wrong():
    target = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 1, 2, 2, 3])  # 4 clusters, 2 classes: only 2 clusters get a class
    assert hungarian_f1(pred, target) == pytest.approx(4 / 6)
    # class 0 matched to cluster 0 (2 of 2 predicted, 3 true) -> 2*2/(2+3); same for class 1.
    assert hungarian_f1(pred, target, "macro") == pytest.approx(0.8)
    with pytest.raises(TexadError):
        hungarian_f1(pred, target, "weighted")


@pytest.mark.parametrize("seed", range(6))
def test_nmi_and_ari_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, int(rng.integers(2, 6)), 80)
    pred = np.where(rng.random(80) < 0.5, target, rng.integers(0, int(rng.integers(1, 7)), 80))
    assert normalized_mutual_info(pred, target) == pytest.approx(normalized_mutual_info_score(target, pred), abs=1e-10)
    assert adjusted_rand_index(pred, target) == pytest.approx(adjusted_rand_score(target, pred), abs=1e-10)


@pytest.mark.parametrize(
    "pred,target",
    [
        ([0, 0, 0, 0], [1, 1, 1, 1]),  # one cluster, one class
        ([0, 1, 2, 3], [0, 1, 2, 3]),  # all singletons
        ([0, 0, 0, 0], [0, 1, 2, 3]),  # one cluster vs singletons
        ([0, 0, 1, 1], [0, 1, 0, 1]),  # independent
    ],
)
def test_nmi_and_ari_degenerate_cases_match_sklearn(pred, target):
    assert normalized_mutual_info(pred, target) == pytest.approx(normalized_mutual_info_score(target, pred), abs=1e-12)
    assert adjusted_rand_index(pred, target) == pytest.approx(adjusted_rand_score(target, pred), abs=1e-12)


def test_clustering_metric_accumulates_batches():
    rng = np.random.default_rng(11)
    target = rng.integers(0, 4, 50)
    pred = np.where(rng.random(50) < 0.7, (target + 1) % 5, rng.integers(0, 5, 50))
    metric = ClusteringMetrics()
    for batch in np.array_split(np.arange(50), 3):
        metric.update(torch.from_numpy(pred[batch]), torch.from_numpy(target[batch]))
    result = metric.compute()
    assert result["nmi"] == pytest.approx(normalized_mutual_info_score(target, pred), abs=1e-10)
    assert result["ari"] == pytest.approx(adjusted_rand_score(target, pred), abs=1e-10)
    assert result["cluster_f1"] == pytest.approx(brute_force_f1(pred, target)[0], abs=1e-12)
    assert round(result["cluster_f1_macro"], 12) in brute_force_f1(pred, target)[1]
    metric.reset()
    assert all(math.isnan(v) for v in metric.compute().values())
