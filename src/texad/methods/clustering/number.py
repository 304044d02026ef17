"""How many defect types? Estimating the number of clusters without labels.

The paper (and the official BlindLCA code) cut the Ward tree at the *true* number of classes, an
oracle a user with a new production line does not have. Three classical label-free criteria are
implemented here, all on the same Ward hierarchy the method clusters with (scipy's ``ward`` linkage,
which merges exactly as scikit-learn's ``AgglomerativeClustering(linkage="ward")``):

* ``gap`` — the largest jump between consecutive merge heights: cut where the next merge would
  join two groups much further apart than anything merged so far (the "long branch" a person looks
  for in a dendrogram). k = argmax_k h_{n-k} − h_{n-k-1}, heights ascending, merges 0-indexed.
* ``silhouette`` — the Ward cut into k clusters with the best mean silhouette (Rousseeuw 1987,
  Euclidean, scikit-learn's ``silhouette_score``).
* ``eigengap`` — the largest gap λ_{k+1} − λ_k of the symmetric normalised graph Laplacian of a
  self-tuning Gaussian affinity (Zelnik-Manor & Perona 2004: σ_i = distance of point i to its 7th
  nearest neighbour), a criterion from spectral clustering applied to the descriptors.

All search k in [k_min, k_max] (k_max capped at n − 1). A fourth rule needs a constant fitted on
labelled data (``selection.choose_k_rule`` fits it on validation families): ``height_cut_k`` cuts the
tree at a fixed multiple of the descriptors' own scale (the median nearest-neighbour distance), i.e.
"a new type starts where a merge joins groups that far apart". Which one is the default was decided on
synthetic, well-separated and harder Gaussian mixtures (``texad.tools.clustering_study``), never on
the test labels; see ``conf/method/clustering.yaml``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import cdist
from sklearn.metrics import silhouette_score

from texad.errors import TexadError

__all__ = ["K_CRITERIA", "ward_linkage", "cut_tree", "estimate_k", "criterion_scores", "neighbour_scale", "height_cut_k"]

K_CRITERIA = ("gap", "silhouette", "eigengap")


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def ward_linkage(descriptors) -> np.ndarray:
    """scipy linkage matrix (n−1, 4) of Ward clustering on Euclidean distances."""
    x = _numpy(descriptors)
    if x.ndim != 2 or x.shape[0] < 2:
        raise TexadError(f"Ward clustering needs at least 2 descriptors (N, D), got shape {x.shape}")
    return linkage(x, method="ward", metric="euclidean")


def cut_tree(linkage_matrix: np.ndarray, k: int) -> np.ndarray:
    """Cluster ids 0..k−1 of the Ward tree cut into k clusters (ids ordered by first appearance)."""
    n = linkage_matrix.shape[0] + 1
    if not 1 <= k <= n:
        raise TexadError(f"cannot cut {n} items into {k} clusters")
    labels = fcluster(linkage_matrix, t=k, criterion="maxclust")
    _, first = np.unique(labels, return_index=True)
    order = {lab: i for i, lab in enumerate(labels[np.sort(first)])}
    return np.array([order[lab] for lab in labels], dtype=np.int64)


def _k_range(n: int, k_min: int, k_max: int) -> range:
    hi = min(int(k_max), n - 1)
    lo = max(2, int(k_min))
    if hi < lo:
        raise TexadError(f"cannot estimate the number of clusters of {n} images in [{k_min}, {k_max}]: "
                         "need at least 3 images and k_max >= 2 (method.k_max)")
    return range(lo, hi + 1)


def criterion_scores(descriptors, criterion: str, k_min: int = 2, k_max: int = 10,
                     linkage_matrix: np.ndarray | None = None) -> dict[int, float]:
    """Score of every candidate k under one criterion (the estimate is the arg-max)."""
    if criterion not in K_CRITERIA:
        raise TexadError(f"method.k_criterion must be one of {list(K_CRITERIA)}, got {criterion!r}")
    x = _numpy(descriptors)
    n = x.shape[0]
    ks = _k_range(n, k_min, k_max)
    z = ward_linkage(x) if linkage_matrix is None else linkage_matrix
    if criterion == "gap":
        h = z[:, 2]
        return {k: float(h[n - k] - h[n - k - 1]) for k in ks}
    if criterion == "silhouette":

        out = {}
        for k in ks:
            labels = cut_tree(z, k)
            out[k] = float(silhouette_score(x, labels)) if len(np.unique(labels)) > 1 else -1.0
        return out
    eigenvalues = laplacian_spectrum(x)
    return {k: float(eigenvalues[k] - eigenvalues[k - 1]) for k in ks}


def laplacian_spectrum(x: np.ndarray, neighbour: int = 7) -> np.ndarray:
    """Ascending eigenvalues of I − D^-½ A D^-½, A_ij = exp(−d_ij² / (σ_i σ_j)), σ_i = d(i, its 7th NN)."""
    d = cdist(x, x)
    n = len(x)
    m = min(neighbour, n - 1)
    sigma = np.sort(d, axis=1)[:, m]
    sigma = np.where(sigma > 0, sigma, max(float(d.max()), 1e-12))
    a = np.exp(-(d**2) / np.outer(sigma, sigma))
    np.fill_diagonal(a, 0.0)
    deg = a.sum(1)
    inv = 1.0 / np.sqrt(np.maximum(deg, 1e-300))
    lap = np.eye(n) - inv[:, None] * a * inv[None, :]
    return np.sort(np.linalg.eigvalsh((lap + lap.T) / 2))


def estimate_k(descriptors, criterion: str = "silhouette", k_min: int = 2, k_max: int = 10,
               linkage_matrix: np.ndarray | None = None) -> int:
    """The number of clusters the criterion picks (smallest k among ties)."""
    scores = criterion_scores(descriptors, criterion, k_min, k_max, linkage_matrix)
    best = max(scores.values())
    return min(k for k, s in scores.items() if s == best)


def neighbour_scale(descriptors) -> float:
    """Median distance of each descriptor to its nearest other one: the unit a cut height is measured in."""
    d = cdist(_numpy(descriptors), _numpy(descriptors))
    np.fill_diagonal(d, np.inf)
    return float(np.median(d.min(1)))


def height_cut_k(descriptors, factor: float, k_min: int = 2, k_max: int = 10,
                 linkage_matrix: np.ndarray | None = None) -> int:
    """Clusters left by cutting the Ward tree at factor × `neighbour_scale`, kept within [k_min, k_max]."""
    x = _numpy(descriptors)
    ks = _k_range(x.shape[0], k_min, k_max)
    z = ward_linkage(x) if linkage_matrix is None else linkage_matrix
    k = 1 + int(np.sum(z[:, 2] > factor * neighbour_scale(x)))
    return int(min(max(k, ks.start), ks.stop - 1))
