"""The clustering's settings chosen on typed validation defects, never on the test types.

The validation set (``AnomalyDataModule.typed_validation_dataset``) is the validation normals turned
into defective copies of eight families that come in confusable pairs (``texad.data.type_families``),
with maps from the run's own map source. Every score is Ward on the descriptors cut at the true number
of validation families, NMI (ARI and F1 recorded beside it). What is chosen:

* **raw descriptors** (no head): τ × layers, the whole grid.
* **head**: a coordinate search from the configured values, one factor at a time in this order: τ,
  layers, pair mining (k, mutual), negatives per anchor. Each candidate trains a fresh head (seeded)
  for the largest of ``epochs`` and is scored after each of them; its score is its best, and the
  epoch count that gave it is part of the setting. A candidate replaces the current one only with a
  strictly higher NMI, so ties keep the configured values.
* **the k rule**, per kind (raw, head): among ``K_CRITERIA`` and a Ward cut at a height fitted on
  validation (``number.height_cut_k``), the one whose estimate lies closest to the truth (mean
  |k̂ − k|) on seeded random subsets of 3 … F validation families (several per size), so a rule is
  judged at many numbers of types, not only at the eight the set has; ties keep the configured rule.

The search is one factor at a time (not the full grid) to fit a CPU budget: about eight head trainings
on 64 images. Like every validation choice it is noisy at this size; the run records every candidate's
score so a user sees how far apart they were.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch

from texad.errors import TexadError
from texad.methods.clustering.number import (
    K_CRITERIA,
    cut_tree,
    estimate_k,
    height_cut_k,
    neighbour_scale,
    ward_linkage,
)
from texad.methods.clustering.torch_model import (
    ClusteringModel,
    ProjectionHead,
    image_descriptors,
    mine_pairs,
    pair_training_data,
    train_head,
)
from texad.data.type_families import TYPE_FAMILIES
from texad.metrics.clustering import cluster_scores

log = logging.getLogger(__name__)

__all__ = ["HeadSetting", "RawSetting", "Validation", "choose_raw", "choose_head", "choose_k_rule", "check_criteria", "ward_scores",
           "setting_descriptors", "estimate_with_rule", "K_RULES", "SELECTION_DEFAULTS", "check_selection",
           "choose_settings"]


@dataclass(frozen=True)
class RawSetting:
    temperature: float
    layers: tuple[int, ...]


@dataclass(frozen=True)
class HeadSetting:
    temperature: float
    layers: tuple[int, ...]
    k: int
    mutual: bool
    n_negatives: int
    epochs: int

    def raw(self) -> RawSetting:
        return RawSetting(self.temperature, self.layers)


@dataclass
class Validation:
    """Typed validation images: all-layer features (N, C, h, w), border-cleared maps (N, h, w), labels."""

    features: torch.Tensor
    maps: torch.Tensor
    types: list[str]

    @property
    def target(self) -> np.ndarray:
        classes = sorted(set(self.types))
        return np.array([classes.index(t) for t in self.types])

    @property
    def n_types(self) -> int:
        return len(set(self.types))


def ward_scores(descriptors: torch.Tensor, target: np.ndarray, k: int) -> dict[str, float]:
    """NMI, ARI and F1 of the Ward cut into k clusters."""
    return cluster_scores(cut_tree(ward_linkage(descriptors), k), target)


def setting_descriptors(model: ClusteringModel, features: torch.Tensor, maps: torch.Tensor, setting: RawSetting,
                        options: dict[str, Any], head: torch.nn.Module | None = None) -> torch.Tensor:
    """(N, C') descriptors of all-layer features (N, C, h, w) and border-cleared maps at `setting`'s τ and layers."""
    index = model.channels(setting.layers).to(features.device)
    return image_descriptors(features[:, index], maps, setting.temperature, head=head,
                             normal_pixels=model.normal_sample(setting.layers), **options).float()


def choose_raw(model: ClusteringModel, val: Validation, start: RawSetting, temperatures: Sequence[float],
               layer_sets: Sequence[tuple[int, ...]], options: dict[str, Any]) -> tuple[RawSetting, list[dict]]:
    """The raw descriptors' τ and layers with the best validation NMI (the start wins ties)."""
    candidates = [start] + [RawSetting(float(t), tuple(ls)) for t, ls in itertools.product(temperatures, layer_sets)]
    best, best_nmi, table, seen = start, -np.inf, [], set()
    for cand in candidates:
        if cand in seen:
            continue
        seen.add(cand)
        scores = ward_scores(setting_descriptors(model, val.features, val.maps, cand, options), val.target, val.n_types)
        table.append({**asdict(cand), **scores})
        if scores["nmi"] > best_nmi:
            best, best_nmi = cand, scores["nmi"]
    return best, table


def _train_and_score(model: ClusteringModel, val: Validation, setting: HeadSetting, epochs: Sequence[int],
                     options: dict[str, Any], training: dict[str, Any], seed: int) -> dict[int, tuple[dict, torch.Tensor]]:
    """A fresh head trained with `setting` on the validation images; scores and descriptors after each epoch in `epochs`."""
    index = model.channels(setting.layers)
    feats = val.features[:, index]
    raw = setting_descriptors(model, val.features, val.maps, setting.raw(), options)
    positives, negatives = mine_pairs(raw, setting.k, training["negative_quantile"], setting.mutual)
    data = pair_training_data(feats, val.maps, positives, negatives, training["anomalous_level"])
    torch.manual_seed(seed)
    head = ProjectionHead(len(index), model.hidden_channels, model.out_channels)
    out: dict[int, tuple[dict, torch.Tensor]] = {}

    def score(epoch: int) -> None:
        if epoch in epochs:
            d = setting_descriptors(model, val.features, val.maps, setting.raw(), options, head=head)
            out[epoch] = (ward_scores(d, val.target, val.n_types), d)

    train_head(head, data, max(epochs), seed, n_negatives=setting.n_negatives, anchor_pixels=training["anchor_pixels"],
               pair_pixels=training["pair_pixels"], margin=training["margin"], lr=training["lr"],
               weight_decay=training["weight_decay"], after_epoch=score)
    return out


def choose_head(model: ClusteringModel, val: Validation, start: HeadSetting, grid: dict[str, Sequence],
                options: dict[str, Any], training: dict[str, Any], seed: int) -> tuple[HeadSetting, list[dict], torch.Tensor]:
    """Coordinate search over τ, layers, mining and negatives (module docstring); epochs scored along each training.

    Returns the chosen setting, every candidate's validation scores, and the chosen head's validation descriptors.
    """
    epochs = sorted({int(e) for e in grid.get("epochs") or [start.epochs]})
    steps = [("temperature", [{"temperature": float(t)} for t in grid.get("temperature", [])]),
             ("layers", [{"layers": tuple(ls)} for ls in grid.get("layers", [])]),
             ("mining", [{"k": int(m["k"]), "mutual": bool(m.get("mutual", False))} for m in grid.get("mining", [])]),
             ("n_negatives", [{"n_negatives": int(n)} for n in grid.get("n_negatives", [])])]
    runs: dict[HeadSetting, dict[int, tuple[dict, torch.Tensor]]] = {}
    table: list[dict] = []

    def evaluate(setting: HeadSetting) -> tuple[float, int]:
        key = replace(setting, epochs=0)
        if key not in runs:
            runs[key] = _train_and_score(model, val, setting, epochs, options, training, seed)
            for e, (scores, _) in runs[key].items():
                table.append({**asdict(replace(setting, epochs=e)), **scores})
            log.info("clustering validation: %s -> NMI %s", key,
                     {e: round(s["nmi"], 3) for e, (s, _) in runs[key].items()})
        best_epoch = max(epochs, key=lambda e: (runs[key][e][0]["nmi"], -epochs.index(e)))
        return runs[key][best_epoch][0]["nmi"], best_epoch

    best_nmi, best_epoch = evaluate(start)
    current = replace(start, epochs=best_epoch)
    for _, values in steps:
        for change in values:
            cand = replace(current, **change)
            nmi, epoch = evaluate(cand)
            if nmi > best_nmi:
                best_nmi, current = nmi, replace(cand, epochs=epoch)
    chosen_descriptors = runs[replace(current, epochs=0)][current.epochs][1]
    return current, table, chosen_descriptors


def estimate_with_rule(descriptors: torch.Tensor, rule: dict[str, Any], k_min: int, k_max: int,
                       linkage_matrix: np.ndarray | None = None) -> int:
    """k̂ under a rule: {"criterion": one of K_CRITERIA} or {"criterion": "height", "factor": f} (``height_cut_k``)."""
    if rule["criterion"] == "height":
        return height_cut_k(descriptors, float(rule["factor"]), k_min, k_max, linkage_matrix)
    return estimate_k(descriptors, rule["criterion"], k_min, k_max, linkage_matrix)


def _family_subsets(n_families: int, per_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random subsets of 3 … F families, `per_size` of each size (the whole set once)."""
    subsets = []
    for size in range(min(3, n_families), n_families + 1):
        draws = 1 if size == n_families else per_size
        subsets += [rng.choice(n_families, size, replace=False) for _ in range(draws)]
    return subsets


def choose_k_rule(descriptors: torch.Tensor, types: Sequence[str], criteria: Sequence[str], default: str,
                  k_min: int, k_max: int, subsets_per_size: int, seed: int) -> tuple[dict[str, Any], dict[str, dict]]:
    """The k rule whose estimates lie closest to the truth on subsets of 3 … F validation families.

    Candidates: each of ``criteria`` (no constant), and ``height`` when listed: the Ward cut at a factor
    × the median nearest-neighbour distance, the factor fitted on one draw of subsets and scored, like
    the others, on another draw (so its fitted constant does not flatter it). Returns the rule and, per
    candidate, its mean |k̂ − k|, mean k̂ − k and the fraction of exact estimates on the scoring draw.
    """
    families = sorted(set(types))
    labels = np.array([families.index(t) for t in types])
    x = descriptors.double().cpu()
    rng = np.random.default_rng(seed)
    fit_subsets = _family_subsets(len(families), subsets_per_size, rng)
    score_subsets = _family_subsets(len(families), subsets_per_size, rng)

    def parts(subsets):
        out = []
        for chosen in subsets:
            sub = x[torch.from_numpy(np.isin(labels, chosen))]
            out.append((sub, ward_linkage(sub), len(chosen)))
        return out

    scoring = parts(score_subsets)
    rules = [{"criterion": c} for c in criteria if c != "height"]
    if "height" in criteria:
        rules.append({"criterion": "height", "factor": _fit_height_factor(parts(fit_subsets), k_min, k_max)})
    summary = {}
    for rule in rules:
        errors = np.array([estimate_with_rule(sub, rule, k_min, k_max, z) - k for sub, z, k in scoring])
        summary[rule["criterion"]] = {"mean_abs_error": float(np.mean(np.abs(errors))), "exact": float(np.mean(errors == 0)),
                                      "mean_error": float(np.mean(errors)), **({"factor": rule["factor"]} if "factor" in rule else {})}
    order = [default] + [r["criterion"] for r in rules if r["criterion"] != default]
    best = min((c for c in order if c in summary), key=lambda c: (summary[c]["mean_abs_error"], order.index(c)))
    return next(r for r in rules if r["criterion"] == best), summary


def _fit_height_factor(parts: list[tuple[torch.Tensor, np.ndarray, int]], k_min: int, k_max: int) -> float:
    """The cut factor with the least mean |k̂ − k| over the subsets (the middle one, geometrically, among ties)."""
    ratios = np.concatenate([z[:, 2] / max(neighbour_scale(sub), 1e-12) for sub, z, _ in parts])
    candidates = np.geomspace(max(ratios.min(), 1e-6), ratios.max() * 1.01, 200)
    errors = np.array([np.mean([abs(height_cut_k(sub, f, k_min, k_max, z) - k) for sub, z, k in parts])
                       for f in candidates])
    tied = candidates[errors == errors.min()]
    return float(np.sqrt(tied[0] * tied[-1]))


K_RULES = (*K_CRITERIA, "height")


def check_criteria(criteria: Sequence[str]) -> list[str]:
    bad = [c for c in criteria if c not in K_RULES]
    if bad or not criteria:
        raise TexadError(f"method.selection.k_criteria={list(criteria)}: choose among {list(K_RULES)}")
    return list(criteria)


# --- the whole choice, as the clustering method runs it ---------------------------------------------
SELECTION_DEFAULTS: dict[str, Any] = {
    "enabled": False, "families": list(TYPE_FAMILIES), "per_family": 8, "temperature": [], "layers": [],
    "mining": [], "n_negatives": [], "epochs": [], "k_criteria": list(K_CRITERIA), "k_subsets": 3,
}


def check_selection(selection: dict | None, epochs: int) -> dict[str, Any]:
    """method.selection with defaults filled in, checked (unknown keys, empty or out-of-range values)."""
    given = dict(selection or {})
    unknown = sorted(set(given) - set(SELECTION_DEFAULTS))
    if unknown:
        raise TexadError(f"method.selection: unknown keys {unknown}; expected some of {sorted(SELECTION_DEFAULTS)}")
    sel = {**SELECTION_DEFAULTS, **given}
    sel["enabled"] = bool(sel["enabled"])
    sel["families"] = [str(f) for f in sel["families"]]
    bad = [f for f in sel["families"] if f not in TYPE_FAMILIES]
    if bad or len(sel["families"]) < 3:
        raise TexadError(f"method.selection.families={sel['families']}: at least 3 of {list(TYPE_FAMILIES)}")
    if int(sel["per_family"]) < 2:
        raise TexadError(f"method.selection.per_family must be at least 2, got {sel['per_family']}")
    sel["per_family"] = int(sel["per_family"])
    sel["temperature"] = [float(t) for t in sel["temperature"]]
    if any(t <= 0 for t in sel["temperature"]):
        raise TexadError(f"method.selection.temperature: every τ must be positive, got {sel['temperature']}")
    sel["layers"] = [tuple(int(i) for i in ls) for ls in sel["layers"]]
    sel["mining"] = [dict(m) for m in sel["mining"]]
    for m in sel["mining"]:
        if "k" not in m or int(m["k"]) < 1 or set(m) - {"k", "mutual"}:
            raise TexadError(f"method.selection.mining: each entry is {{k: >=1, mutual: bool}}, got {m}")
    sel["n_negatives"] = [int(n) for n in sel["n_negatives"]]
    if any(n < 1 for n in sel["n_negatives"]):
        raise TexadError(f"method.selection.n_negatives must all be at least 1, got {sel['n_negatives']}")
    sel["epochs"] = sorted({int(e) for e in sel["epochs"]})
    if sel["enabled"] and any(e < 1 or e > int(epochs) for e in sel["epochs"]):
        raise TexadError(f"method.selection.epochs={sel['epochs']} must lie in 1..method.epochs={epochs} "
                         "(the trainer runs at most method.epochs)")
    sel["k_criteria"] = check_criteria([str(c) for c in sel["k_criteria"]])
    sel["k_subsets"] = int(sel["k_subsets"])
    if sel["k_subsets"] < 1:
        raise TexadError(f"method.selection.k_subsets must be at least 1, got {sel['k_subsets']}")
    return sel


def _same(row: dict[str, Any], setting: Any) -> bool:
    """A candidate-table row describes this setting."""
    return all(row[key] == value for key, value in asdict(setting).items())


def choose_settings(model: ClusteringModel, val: Validation, source: str, configured: dict[str, Any],
                    sel: dict[str, Any], options: dict[str, Any], training: dict[str, Any], k_criterion: str,
                    k_min: int, k_max: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """τ, layers, mining, negatives, epochs and the k rules chosen on typed validation defects.

    Returns the settings in use ({"head", "raw", "k_rule"}) and the record for metrics.json (the choice,
    its validation NMI and every candidate)."""
    raw, raw_table = choose_raw(model, val, configured["raw"], sel["temperature"], sel["layers"], options)
    head, head_table, head_desc = choose_head(model, val, configured["head"], sel, options, training, seed)
    raw_desc = setting_descriptors(model, val.features, val.maps, raw, options)
    rules, rule_errors = {}, {}
    for kind, desc in (("raw", raw_desc), ("head", head_desc)):
        rules[kind], rule_errors[kind] = choose_k_rule(desc, val.types, sel["k_criteria"], k_criterion,
                                                       k_min, k_max, sel["k_subsets"], seed)
    best = {kind: max(r["nmi"] for r in table if _same(r, chosen))
            for kind, table, chosen in (("raw", raw_table, raw), ("head", head_table, head))}
    record = {
        "status": "chosen on validation",
        "families": sorted(set(val.types)), "images": len(val.types), "maps": source,
        "chosen": {"head": asdict(head), "raw": asdict(raw), "k_rule": rules},
        "val_nmi": {"head": best["head"], "raw": best["raw"],
                    "raw_configured": raw_table[0]["nmi"]},
        # not a switch: both are always reported; this says which one validation would trust
        "validation_prefers": "head" if best["head"] > best["raw"] else "raw",
        "k_rule_errors": rule_errors,
        "candidates": {"raw": raw_table, "head": head_table},
    }
    log.info("clustering: chosen on %d validation images (%d families, %s maps): head %s (NMI %.3f), "
             "raw %s (NMI %.3f), k rules %s", len(val.types), val.n_types, source, head, best["head"], raw,
             best["raw"], rules)
    return {"head": head, "raw": raw, "k_rule": rules}, record
