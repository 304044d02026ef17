"""What the clustering reports after the test pass: Ward on the descriptors without and with the head,
cut at the number of clusters in use, at the true and at the estimated number; scores, every k
criterion's estimate, how k was chosen in words, and paired bootstrap intervals of head − raw."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from texad.methods.clustering.number import K_CRITERIA, cut_tree, ward_linkage
from texad.methods.clustering.validation_choice import estimate_with_rule
from texad.metrics.clustering import paired_clustering_differences


def k_reason(kind: str, fixed: int | None, wanted: Any, rule: dict[str, Any], chosen_on_validation: bool) -> str:
    """How the number of clusters of `kind` was chosen, in words (figures, metrics.json)."""
    if wanted == "oracle":
        return "oracle: the number of defect types"
    if fixed is not None:
        return f"fixed: method.n_clusters={wanted}"
    name = (f"a Ward cut at {rule['factor']:.2f} x the median nearest-neighbour distance"
            if rule["criterion"] == "height" else rule["criterion"])
    if chosen_on_validation:
        return f"estimated by {name}, the k rule chosen on validation"
    return f"estimated by {name} (method.k_criterion)"


@dataclass
class ClusterReport:
    """Per kind ("raw", "head"): the Ward tree, the clusters at the k in use, that k and why, the scores."""

    record: dict[str, Any] = field(default_factory=dict)  # keys for the test results (metrics.json)
    linkages: dict[str, np.ndarray] = field(default_factory=dict)
    clusters: dict[str, np.ndarray] = field(default_factory=dict)
    used_k: dict[str, int | None] = field(default_factory=dict)
    scores: dict[str, dict[str, float] | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    estimates: dict[str, dict[str, int]] = field(default_factory=dict)
    true_k: dict[str, np.ndarray] = field(default_factory=dict)


def cluster_and_score(descriptors: dict[str, torch.Tensor], classes: list[str], target: torch.Tensor, labelled: bool,
                      fixed: int | None, k_rules: dict[str, dict[str, Any]], reasons: dict[str, str], k_min: int,
                      k_max: int, score: Callable[[str, np.ndarray, torch.Tensor], dict[str, float]]) -> ClusterReport:
    """Ward on each kind's descriptors (raw first, then head), cut and scored; `score(kind, clusters, target)`."""
    out = ClusterReport(reasons=dict(reasons))
    res = out.record
    n = len(target)
    for kind in ("raw", "head"):
        prefix = "" if kind == "head" else "raw_"
        out.linkages[kind] = ward_linkage(descriptors[kind])
        k_est = None
        if n >= 3:
            rule = k_rules[kind]
            # every criterion's estimate is recorded; the rule in use is one of them or the fitted height
            for criterion in (*K_CRITERIA, *(["height"] if rule["criterion"] == "height" else [])):
                out.estimates.setdefault(criterion, {})[kind] = estimate_with_rule(
                    descriptors[kind], rule if criterion == "height" else {"criterion": criterion},
                    k_min, k_max, out.linkages[kind])
            k_est = out.estimates[rule["criterion"]][kind]
        out.used_k[kind] = fixed if fixed is not None else k_est
        out.clusters[kind] = cut_tree(out.linkages[kind], out.used_k[kind])
        res[f"{prefix}n_clusters"] = out.used_k[kind]
        res[f"{prefix}k_estimated"] = k_est
        res[f"{prefix}k_rule"] = k_rules[kind]
        res[f"{prefix}k_how"] = out.reasons[kind]
        if not labelled:
            out.scores[kind] = None
            continue
        out.scores[kind] = score(kind, out.clusters[kind], target)
        res.update({f"{prefix}{key}": v for key, v in out.scores[kind].items()})
        for tag, k_value in (("true_k", len(classes)), ("est_k", k_est)):
            if k_value is None or k_value > n:
                continue
            other = score(kind, cut_tree(out.linkages[kind], k_value), target)
            res.update({f"{tag}_{prefix}{key}": v for key, v in other.items()})
    if labelled:
        out.true_k = {f"{prefix}cluster_true_k": cut_tree(out.linkages[kind], len(classes))
                      for kind, prefix in (("head", ""), ("raw", "raw_"))}
    return out


def head_vs_raw_intervals(clusters: dict[str, np.ndarray], true_k: dict[str, np.ndarray],
                          target: torch.Tensor) -> dict[str, Any]:
    """Paired bootstrap (types kept, 1000 replicates, seed 0) of head − raw, at the k in use and at the true k."""
    out = {}
    for tag, head, raw in (("", clusters["head"], clusters["raw"]),
                           ("true_k_", true_k["cluster_true_k"], true_k["raw_cluster_true_k"])):
        diffs = paired_clustering_differences([head], [raw], target.numpy())
        out.update({f"{tag}head_minus_raw_{name}": d for name, d in diffs.items()})
    return out
