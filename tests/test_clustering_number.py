"""Estimating the number of clusters: the true k on well-separated data, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest

from texad.errors import TexadError
from texad.methods.clustering.number import (
    K_CRITERIA,
    criterion_scores,
    cut_tree,
    estimate_k,
    laplacian_spectrum,
    ward_linkage,
)
from texad.tools.clustering_study import gaussian_mixture
from texad.metrics import adjusted_rand_index


@pytest.mark.parametrize("k", [2, 3, 5, 7])
@pytest.mark.parametrize("seed", range(3))
def test_every_criterion_finds_k_of_well_separated_balanced_clusters(k, seed):
    x, _ = gaussian_mixture(np.random.default_rng(seed), 40, k, 64, separation=4.0, balanced=True, anisotropic=True)
    for criterion in K_CRITERIA:
        assert estimate_k(x, criterion, 2, 10) == k, criterion


@pytest.mark.parametrize("seed", range(10))
def test_silhouette_finds_k_of_well_separated_unbalanced_clusters(seed):
    """The default criterion also copes with unbalanced sizes (2..30 points per cluster), where the
    largest merge gap and the eigengap often stop early (study: 0.6-0.9 and ~0.4 exact vs 1.0)."""
    rng = np.random.default_rng(100 + seed)
    k = int(rng.integers(2, 9))
    x, labels = gaussian_mixture(rng, 40, k, 32, separation=4.0, balanced=False, anisotropic=False)
    assert estimate_k(x, "silhouette", 2, 10) == k
    # and the cut at that k is the true partition
    assert adjusted_rand_index(cut_tree(ward_linkage(x), k), labels) == pytest.approx(1.0)


def test_ward_cut_equals_scikit_learn_ward():
    from sklearn.cluster import AgglomerativeClustering

    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 5))
    z = ward_linkage(x)
    for k in range(1, 9):
        ours = cut_tree(z, k)
        theirs = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)
        assert adjusted_rand_index(ours, theirs) == pytest.approx(1.0), k
        assert sorted(np.unique(ours)) == list(range(k))


def test_criteria_scores_against_direct_computations():
    from scipy.cluster.hierarchy import fcluster
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(5)
    x = rng.normal(size=(25, 4))
    z = ward_linkage(x)
    heights = sorted(z[:, 2])
    gap = criterion_scores(x, "gap", 2, 6)
    for k in range(2, 7):
        # going from k to k-1 clusters is merge number n-k (1-based n-k+1): its height minus the previous one
        assert gap[k] == pytest.approx(heights[25 - k] - heights[25 - k - 1])
    sil = criterion_scores(x, "silhouette", 2, 6)
    for k in range(2, 7):
        assert sil[k] == pytest.approx(silhouette_score(x, fcluster(z, k, "maxclust")))
    # eigengap: spectrum of the normalised Laplacian from a dense brute-force construction
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    sigma = np.sort(d, 1)[:, 7]
    a = np.exp(-d**2 / np.outer(sigma, sigma))
    np.fill_diagonal(a, 0)
    deg = np.diag(1 / np.sqrt(a.sum(1)))
    expected = np.sort(np.linalg.eigvals(np.eye(25) - deg @ a @ deg).real)
    assert laplacian_spectrum(x) == pytest.approx(expected, abs=1e-9)
    eig = criterion_scores(x, "eigengap", 2, 6)
    assert eig[4] == pytest.approx(expected[4] - expected[3])


def test_bad_requests_are_refused():
    x = np.zeros((2, 3))
    with pytest.raises(TexadError, match="at least 3 images"):
        estimate_k(x, "silhouette")
    with pytest.raises(TexadError, match="method.k_criterion must be one of"):
        estimate_k(np.random.default_rng(0).normal(size=(10, 2)), "elbow")
