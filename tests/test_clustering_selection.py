"""Choosing the clustering on typed validation defects: the families, the validation set, the choices
(against brute-force loops), the paired intervals, and a tiny run that records what it chose."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import nn

from conftest import TINY, compose_cfg
from texad.data.embedded import ensure_texture_set
from texad.data.synthetic import ALL_GENERATORS
from texad.data.type_families import TYPE_FAMILIES, plant_family
from texad.errors import TexadError
from scipy.cluster.hierarchy import fcluster

from texad.methods.clustering.number import estimate_k, height_cut_k, neighbour_scale, ward_linkage
from texad.methods.clustering.validation_choice import (
    HeadSetting,
    RawSetting,
    Validation,
    choose_head,
    choose_k_rule,
    choose_raw,
    setting_descriptors,
    ward_scores,
)
from texad.methods.clustering.torch_model import ClusteringModel
from texad.metrics.clustering import cluster_scores, paired_clustering_differences, stratified_draws
from texad.pipeline import evaluate, train

torch.set_num_threads(1)


# --- the families ---------------------------------------------------------------------------------
def _texture(side: int = 128) -> np.ndarray:
    rng = np.random.default_rng(3)
    base = cv2.GaussianBlur(rng.normal(128, 30, (side, side)).astype(np.float32), (0, 0), 1.5)
    return np.clip(np.repeat(base[..., None], 3, axis=2), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("family", TYPE_FAMILIES)
def test_every_family_plants_one_deterministic_defect_inside_its_mask(family):
    image = _texture()
    out, mask = plant_family(image, family, np.random.default_rng(7))
    again, mask_again = plant_family(image, family, np.random.default_rng(7))
    assert np.array_equal(out, again) and np.array_equal(mask, mask_again)
    assert 0.003 <= mask.mean() <= 0.05
    changed = np.any(out != image, axis=2)
    assert not changed[~mask].any(), "pixels outside the mask changed"
    assert changed[mask].mean() > 0.3, "the defect is hardly visible inside its mask"


def test_families_share_no_name_with_the_test_generators():
    assert not set(TYPE_FAMILIES) & set(ALL_GENERATORS) and len(TYPE_FAMILIES) >= 8
    with pytest.raises(TexadError, match="unknown defect type"):
        plant_family(_texture(), "scratch", np.random.default_rng(0))


def test_typed_validation_set_draws_every_family_on_validation_normals(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg("train", [*TINY, "dataset.n_val_good=3"], tmp_path / "run")
    dm = instantiate(cfg.dataset, _convert_="all")
    ds = dm.typed_validation_dataset(per_family=4)
    assert len(ds) == 4 * len(TYPE_FAMILIES)
    val_paths = {str(s.path) for s in dm.val_samples}
    test_paths = {str(s.path) for s in dm.split.test}
    items = [ds[i] for i in range(len(ds))]
    bases = {it["path"].split("#")[0] for it in items}  # a planted copy is named <base image>#synthetic-<family>
    assert bases == val_paths and not bases & test_paths
    assert [it["defect_type"] for it in items] == [f for f in TYPE_FAMILIES for _ in range(4)]
    assert all(it["label"] == 1 and it["mask"].sum() > 0 for it in items)
    with pytest.raises(TexadError, match="unknown validation type families"):
        dm.typed_validation_dataset(["scratch"])


# --- the choices, against brute force -------------------------------------------------------------
class _Layers(nn.Module):
    """Stands in for a backbone: ClusteringModel reads only its channels per layer."""

    channels = (4, 4, 4)


def _synthetic_validation(seed: int = 0, families: int = 4, per: int = 6) -> Validation:
    """Types differ only in layer 2's channels inside a 3×3 spot; layers 0 and 1 hold strong per-image noise there."""
    g = torch.Generator().manual_seed(seed)
    n = families * per
    features = torch.rand(n, 12, 8, 8, generator=g) * 0.3
    maps = torch.zeros(n, 8, 8)
    types = []
    centres = torch.rand(families, 4, generator=g)
    for i in range(n):
        t = i // per
        y, x = 2 + i % 4, 2 + (i // 4) % 4
        maps[i, y:y + 3, x:x + 3] = 1.0
        features[i, 8:, y:y + 3, x:x + 3] += centres[t].view(4, 1, 1) * 3
        features[i, :8, y:y + 3, x:x + 3] += torch.rand(8, 1, 1, generator=g) * 4
        types.append(f"type{t}")
    return Validation(features, maps, types)


OPTIONS = {"pooling": "softmax", "anomalous_level": 0.5, "center": "image", "standardize": False,
           "normalize": False, "blur_kernel": 3, "blur_sigma": 1.0}


def test_choose_raw_scores_every_candidate_as_a_direct_computation_and_takes_the_best():
    model = ClusteringModel(_Layers())
    val = _synthetic_validation()
    start = RawSetting(0.5, (0, 1, 2))
    chosen, table = choose_raw(model, val, start, [0.05, 0.5], [(0, 1, 2), (2,)], OPTIONS)
    assert len(table) == 4 and table[0]["temperature"] == 0.5 and table[0]["layers"] == (0, 1, 2)
    for row in table:
        setting = RawSetting(row["temperature"], row["layers"])
        index = torch.cat([torch.arange(4 * i, 4 * i + 4) for i in setting.layers])
        from texad.methods.clustering.torch_model import image_descriptors

        direct = image_descriptors(val.features[:, index], val.maps, setting.temperature, **OPTIONS)
        assert row["nmi"] == pytest.approx(ward_scores(direct, val.target, val.n_types)["nmi"])
    best = max(r["nmi"] for r in table)
    assert dict(temperature=chosen.temperature, layers=chosen.layers) in [
        {"temperature": r["temperature"], "layers": r["layers"]} for r in table if r["nmi"] == best]
    assert chosen.layers == (2,)  # only layer 2 carries the types


def test_choose_k_rule_matches_a_brute_force_loop_over_family_subsets():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 6, (6, 5))
    types = [f"f{t}" for t in range(6) for _ in range(7)]
    x = torch.from_numpy(np.concatenate([c + rng.normal(0, 1, (7, 5)) for c in centres]))
    criteria = ["silhouette", "gap", "eigengap", "height"]
    rule, summary = choose_k_rule(x, types, criteria, "gap", 2, 8, 2, seed=5)
    # brute force: the same seeded draws (one to fit the height factor, one to score every rule)
    labels = np.repeat(np.arange(6), 7)
    draw = np.random.default_rng(5)

    def subsets():
        return [draw.choice(6, size, replace=False) for size in range(3, 6) for _ in range(2)] + [draw.choice(6, 6, replace=False)]

    subsets()  # the fitting draw
    scoring = subsets()
    for criterion in criteria:
        def k_hat(sub):
            if criterion == "height":
                return height_cut_k(sub, summary["height"]["factor"], 2, 8)
            return estimate_k(sub, criterion, 2, 8)

        errors = [k_hat(x[torch.from_numpy(np.isin(labels, s))]) - len(s) for s in scoring]
        assert summary[criterion]["mean_abs_error"] == pytest.approx(np.mean(np.abs(errors))), criterion
    best = min(summary[c]["mean_abs_error"] for c in criteria)
    assert summary[rule["criterion"]]["mean_abs_error"] == best
    assert rule["criterion"] == "gap" or summary["gap"]["mean_abs_error"] > best  # ties keep the configured rule
    assert summary["height"]["exact"] >= 0.8  # well-separated families: a fitted cut height finds k


def test_height_cut_counts_the_clusters_scipy_cuts_at_that_distance():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (30, 4))
    z = ward_linkage(x)
    for factor in (0.5, 2.0, 5.0, 20.0):
        expected = len(np.unique(fcluster(z, t=factor * neighbour_scale(x), criterion="distance")))
        assert height_cut_k(x, factor, 2, 29) == max(2, min(expected, 29))
    brute = np.median([np.sort(np.linalg.norm(x - p, axis=1))[1] for p in x])
    assert neighbour_scale(x) == pytest.approx(brute)


def test_choose_head_searches_one_factor_at_a_time_and_never_gets_worse_than_its_start():
    model = ClusteringModel(_Layers(), hidden_channels=16)
    val = _synthetic_validation(1)
    start = HeadSetting(0.5, (0, 1, 2), 2, False, 2, 2)
    training = {"negative_quantile": 0.5, "anomalous_level": 0.5, "anchor_pixels": 5, "pair_pixels": 5,
                "margin": 0.5, "lr": 5e-3, "weight_decay": 0.0}
    grid = {"temperature": [0.05], "layers": [(2,)], "mining": [{"k": 1}], "n_negatives": [], "epochs": [1, 2]}
    chosen, table, descriptors = choose_head(model, val, start, grid, OPTIONS, training, seed=0)
    assert len(table) == 4 * 2  # start, τ, layers, mining: each scored after epochs 1 and 2
    start_best = max(r["nmi"] for r in table[:2])
    chosen_rows = [r for r in table if all(r[k] == v for k, v in chosen.__dict__.items())]
    assert len(chosen_rows) == 1 and chosen_rows[0]["nmi"] >= start_best
    assert chosen.epochs in (1, 2) and descriptors.shape[0] == len(val.types)
    assert ward_scores(descriptors, val.target, val.n_types)["nmi"] == pytest.approx(chosen_rows[0]["nmi"])


# --- paired intervals ----------------------------------------------------------------------------
def test_cluster_scores_match_scikit_learn_and_draws_keep_every_type():
    rng = np.random.default_rng(0)
    target, pred = rng.integers(0, 4, 40), rng.integers(0, 5, 40)
    s = cluster_scores(pred, target)
    assert s["nmi"] == pytest.approx(normalized_mutual_info_score(target, pred))
    assert s["ari"] == pytest.approx(adjusted_rand_score(target, pred))
    draws = stratified_draws(target, 50, seed=1)
    for row in draws:
        assert np.array_equal(np.bincount(target[row], minlength=4), np.bincount(target, minlength=4))


def test_paired_differences_are_zero_for_the_same_clustering_and_resample_both_alike():
    rng = np.random.default_rng(1)
    target = np.repeat(np.arange(4), 8)
    good = target.copy()
    good[:4] = 3
    noisy = rng.integers(0, 4, target.size)
    same = paired_clustering_differences([good], [good], target, n=200)
    assert all(d["difference"] == 0 and d["low"] == 0 and d["high"] == 0 for d in same.values())
    diff = paired_clustering_differences([good, good], [noisy, noisy], target, n=200, seed=3)
    # brute force: replicate r uses the same drawn images for both sides
    idx = stratified_draws(target, 200, 3)
    reps = [normalized_mutual_info_score(target[i], good[i]) - normalized_mutual_info_score(target[i], noisy[i])
            for i in idx]
    assert diff["nmi"]["low"] == pytest.approx(np.percentile(reps, 2.5))
    assert diff["nmi"]["high"] == pytest.approx(np.percentile(reps, 97.5))
    assert diff["nmi"]["excludes_zero"] and diff["nmi"]["difference"] > 0.3


# --- the method records its choice ---------------------------------------------------------------
SELECT = [*TINY, "method=clustering", "eval_callbacks.test_outputs.max_overlays_per_type=0", "method.maps_from=gt",
          "method.n_clusters=null", "method.epochs=2", "method.selection.per_family=3",
          "method.selection.temperature=[0.1]", "method.selection.layers=[[2]]", "method.selection.mining=[{k: 1}]",
          "method.selection.n_negatives=[]", "method.selection.epochs=[1,2]", "method.selection.k_subsets=1"]


@pytest.mark.slow
def test_a_run_chooses_on_validation_records_it_and_its_checkpoint_reproduces_it(tmp_path):
    record = train(compose_cfg("train", SELECT, tmp_path / "run"))
    sel = record["selection"]
    assert sel["status"] == "chosen on validation" and sel["families"] == sorted(TYPE_FAMILIES)
    assert sel["images"] == 3 * len(TYPE_FAMILIES) and sel["maps"] == "gt"
    chosen = sel["chosen"]["head"]
    assert chosen["temperature"] in (0.02, 0.1) and tuple(chosen["layers"]) in ((0, 1, 2), (2,))
    assert chosen["epochs"] in (1, 2) and record["epochs_run"] == chosen["epochs"]
    assert len(sel["candidates"]["head"]) == 4 * 2 and len(sel["candidates"]["raw"]) == 2
    assert set(sel["k_rule_errors"]["head"]) == {"silhouette", "gap", "eigengap", "height"}
    assert record["k_rule"] == sel["chosen"]["k_rule"]["head"] and "chosen on validation" in record["k_how"]
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["selection"]["chosen"] == json.loads(json.dumps(sel["chosen"]))
    assert "pixel_aupr" in record["ci95"]  # the measurement's own intervals stay beside the clustering's
    # head − raw against an independent computation: scikit-learn's NMI of the clusters written to clusters.csv
    with open(tmp_path / "run" / "clusters.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    truth = [r["defect_type"] for r in rows]
    for key, head, raw in (("head_minus_raw_nmi", "cluster", "raw_cluster"),
                           ("true_k_head_minus_raw_nmi", "cluster_true_k", "raw_cluster_true_k")):
        nmi_head = normalized_mutual_info_score(truth, [r[head] for r in rows])
        nmi_raw = normalized_mutual_info_score(truth, [r[raw] for r in rows])
        d = record["ci95"][key]
        assert d["a"] == pytest.approx(nmi_head, abs=1e-9) and d["b"] == pytest.approx(nmi_raw, abs=1e-9), key
        assert d["difference"] == pytest.approx(nmi_head - nmi_raw, abs=1e-9) and d["low"] <= d["high"], key
    d = record["ci95"]["true_k_head_minus_raw_cluster_f1"]
    assert d["difference"] == pytest.approx(record["true_k_cluster_f1"] - record["true_k_raw_cluster_f1"], abs=1e-9)
    for name in ("cluster_grid.png", "dendrogram.png", "clusters.csv"):
        assert (tmp_path / "run" / name).is_file()
    again = evaluate(compose_cfg("evaluate", [f"ckpt_path={tmp_path / 'run/checkpoints/last.ckpt'}", "logger=none"],
                                 tmp_path / "eval"))
    for key in ("nmi", "raw_nmi", "k_estimated", "raw_k_estimated", "true_k_nmi"):
        assert again[key] == pytest.approx(record[key], abs=1e-6), key
    assert again["clustering_settings"] == record["clustering_settings"]


@pytest.mark.slow
def test_a_folder_without_type_labels_is_clustered_and_drawn_without_metrics(tmp_path):
    source = ensure_texture_set("gravel", tmp_path / "source", image_size=64, n_train=6, n_test_good=1, n_per_type=2)
    root = tmp_path / "unlabelled"
    for i, path in enumerate(sorted((source / "train/good").glob("*.png"))):
        (root / "train/good").mkdir(parents=True, exist_ok=True)
        (root / "train/good" / f"{i:03d}.png").write_bytes(path.read_bytes())
    defective = sorted(p for p in (source / "test").glob("*/*.png") if p.parent.name != "good")
    for i, path in enumerate(defective):  # every defective image in one folder: no type labels
        (root / "test/unsorted").mkdir(parents=True, exist_ok=True)
        (root / "test/unsorted" / f"{i:03d}.png").write_bytes(path.read_bytes())
    overrides = ["method=clustering", "dataset=folder", f"dataset.root={root}", "dataset.image_size=64",
                 "dataset.num_workers=0", "dataset.val_fraction=0", "logger=none", "trainer.enable_progress_bar=false",
                 "eval_callbacks.test_outputs.max_overlays_per_type=0", "method.maps_from=fca", "method.epochs=1",
                 "method.fca.feature_input_size=128", "method.selection.enabled=false"]
    record = train(compose_cfg("train", overrides, tmp_path / "run"))
    assert record["n_clustered"] == len(defective) and record["n_types"] is None
    assert "nmi" not in record and "head_minus_raw_nmi" not in record.get("ci95", {})
    assert record["k_estimated"] >= 2
    for name in ("cluster_grid.png", "dendrogram.png", "clusters.png", "clusters.csv"):
        assert (tmp_path / "run" / name).is_file()
    assert Path(tmp_path / "run" / "clusters.csv").read_text().count("\n") == len(defective) + 1
