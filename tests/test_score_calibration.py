"""Image scores calibrated on held-out normal maps (issue 32): statistics and distance against independent
computations, k-fold banks without the scored image's patches, a planted low-contrast defect, the rule
chosen on validation and kept through evaluate.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score

from conftest import TINY
from texad.geometry.grid import PIXELS
from texad.methods.components.score_calibration import (
    STATISTICS, ImageScorer, choose_rule, cross_fitted, fold_splits, map_statistics)
from texad.methods.padim.torch_model import PaDiMModel
from texad.methods.patchcore.torch_model import PatchCoreModel


def hand_statistics(m: np.ndarray, pmean: np.ndarray, pstd: np.ndarray) -> list[float]:
    """The six statistics of one map by plain loops (float64)."""
    h, w = m.shape
    values = sorted(m.ravel().tolist(), reverse=True)
    k = max(1, int(round(0.01 * h * w)))
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    dy = sum(abs(m[i + 1, j] - m[i, j]) for i in range(h - 1) for j in range(w)) / ((h - 1) * w)
    dx = sum(abs(m[i, j + 1] - m[i, j]) for i in range(h) for j in range(w - 1)) / (h * (w - 1))
    zmax = max((m[i, j] - pmean[i, j]) / pstd[i, j] for i in range(h) for j in range(w))
    return [values[0], sum(values[:k]) / k, mean, std, dy + dx, zmax]


def test_statistics_and_calibrated_score_match_independent_computations(one_thread):
    gen = torch.Generator().manual_seed(0)
    normal = torch.rand(12, 9, 11, generator=gen) + torch.linspace(0, 1, 11)  # a location bias
    test = torch.rand(5, 9, 11, generator=gen) * 1.5
    calib = ImageScorer.calibration_of(normal)
    pm, ps = normal.double().mean(0).numpy(), normal.double().std(0, unbiased=False).numpy()
    got = map_statistics(test, calib["pixel_mean"], calib["pixel_std"]).numpy()
    want = np.array([hand_statistics(m, pm, ps) for m in test.double().numpy()])
    assert got.shape == (5, len(STATISTICS))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # diagonal Mahalanobis distance: the diagonal of sklearn's (maximum likelihood) covariance
    # a fit map's zmax is taken against the other fit maps' per-pixel mean / std (leave-one-out)
    arr = normal.double().numpy()
    fit_stats = np.array([hand_statistics(arr[i], np.delete(arr, i, 0).mean(0), np.delete(arr, i, 0).std(0))
                          for i in range(len(arr))])
    cov = EmpiricalCovariance().fit(fit_stats)
    var = np.diag(cov.covariance_)
    want_two = np.sqrt((((want - cov.location_) ** 2) / var).sum(1))
    want_upper = np.sqrt(((np.clip(want - cov.location_, 0, None) ** 2) / var).sum(1))
    scores = ImageScorer.calibrated(test, calib)
    np.testing.assert_allclose(scores["calibrated"].numpy(), want_two, rtol=1e-9)
    np.testing.assert_allclose(scores["calibrated_upper"].numpy(), want_upper, rtol=1e-9)


def test_cross_fitted_validation_normals_never_score_themselves(one_thread):
    gen = torch.Generator().manual_seed(1)
    maps = torch.rand(14, 6, 6, generator=gen)
    labels = torch.tensor([0] * 10 + [1] * 4)
    scores, full = cross_fitted(ImageScorer(), maps, labels, folds=5)
    normal = torch.arange(10)
    for i in range(10):  # normal i (the i-th normal) is in fold i % 5: scored by the other folds' normals
        rest = normal[normal % 5 != i % 5]
        want = ImageScorer.calibrated(maps[i : i + 1], ImageScorer.calibration_of(maps[rest]))
        assert torch.allclose(scores["calibrated"][i], want["calibrated"][0])
    anomalous = ImageScorer.calibrated(maps[10:], ImageScorer.calibration_of(maps[:10]))
    assert torch.allclose(scores["calibrated"][10:], anomalous["calibrated"])
    assert torch.allclose(full["stat_mean"], ImageScorer.calibration_of(maps[:10])["stat_mean"])


def test_patchcore_kfold_banks_never_hold_the_scored_images_patches(one_thread):
    gen = torch.Generator().manual_seed(2)
    n, cells, dim = 11, (3, 4), 5
    images = torch.randn(n, cells[0] * cells[1], dim, generator=gen)  # all patches distinct
    patches = images.reshape(-1, dim)
    picks = torch.randperm(len(patches), generator=gen)[:40]  # a "coreset" mixing every image's patches
    for held, keep in fold_splits(picks // images.shape[1], n, 4):
        bank_images = set((picks[keep] // images.shape[1]).tolist())
        assert not bank_images & set(held.tolist())
    fake = SimpleNamespace(budget_mb=64.0, blur_sigma=0.0)
    maps = PatchCoreModel.heldout_maps(fake, images, patches, picks, cells, PIXELS, cells, folds=4, max_images=n)
    order = torch.cat([held for held, _ in fold_splits(picks // images.shape[1], n, 4)])
    assert maps.shape == (n, *cells)
    for row, i in enumerate(order.tolist()):
        others = picks[(picks // images.shape[1]) % 4 != i % 4]  # the bank without image i's fold
        brute = torch.cdist(images[i].double(), patches[others].double()).amin(1).view(cells)
        assert torch.allclose(maps[row].double(), brute, atol=1e-4)
        assert (maps[row] > 1e-3).all()  # own patches (distance 0) were never in its bank


def test_padim_kfold_gaussians_equal_a_fit_without_the_fold(one_thread):
    gen = torch.Generator().manual_seed(3)
    n, d, h, w, folds = 12, 3, 2, 3, 3
    embs = torch.randn(n, d, h, w, generator=gen) * torch.linspace(0.5, 2, d)[None, :, None, None]
    x = PaDiMModel.locations(embs).double()  # (N, L, d)
    mean = x.mean(0)
    centred = x - mean
    scatter = torch.einsum("nld,nle->lde", centred, centred)
    fake = SimpleNamespace(locations=PaDiMModel.locations, chunk=4, epsilon=0.01, blur_sigma=0.0)
    maps = PaDiMModel.heldout_maps(fake, embs, PIXELS, (h, w), mean.float(), scatter.float(), folds, n)
    row = 0
    for f in range(folds):
        held = [i for i in range(n) if i % folds == f]
        rest = [i for i in range(n) if i % folds != f]
        for i in held:  # brute force: numpy covariance of the other folds, per location
            for loc in range(h * w):
                others = x[rest, loc].numpy()
                cov = np.cov(others, rowvar=False) + 0.01 * np.eye(d)
                diff = x[i, loc].numpy() - others.mean(0)
                want = float(np.sqrt(diff @ np.linalg.inv(cov) @ diff))
                assert abs(float(maps[row].flatten()[loc]) - want) < 1e-3 * max(1.0, want)
            row += 1


def synthetic_maps(n: int, defect: bool, gen: torch.Generator) -> torch.Tensor:
    """Normal maps: low noise plus three harmless 3×3 speckles of random height (they decide the maximum
    and the top 1 %); a defect raises a broad 12×12 area by 0.6, below the speckles' height."""
    maps = 0.1 * torch.rand(n, 32, 32, generator=gen)
    for m in maps:
        for _ in range(3):
            i, j = torch.randint(0, 29, (2,), generator=gen).tolist()
            m[i : i + 3, j : j + 3] += 1.0 + 2.0 * torch.rand(1, generator=gen).item()
        if defect:
            i, j = torch.randint(0, 20, (2,), generator=gen).tolist()
            m[i : i + 12, j : j + 12] += 0.6
    return maps


def test_calibration_separates_a_low_contrast_defect_the_maximum_ranks_at_chance(one_thread):
    gen = torch.Generator().manual_seed(4)
    scorer = ImageScorer()
    scorer.fit(synthetic_maps(40, False, gen), "train_kfold")
    test = torch.cat([synthetic_maps(30, False, gen), synthetic_maps(30, True, gen)])
    labels = np.array([0] * 30 + [1] * 30)
    scores = scorer.scores(test, test.flatten(1).amax(1))
    auroc = {name: roc_auc_score(labels, s.numpy()) for name, s in scores.items()}
    assert auroc["max"] < 0.7 and auroc["top_mean"] < 0.7  # the speckles decide both: about chance
    assert auroc["calibrated"] > 0.95 and auroc["calibrated_upper"] > 0.95


def test_choose_rule_takes_the_best_and_ties_go_to_the_simplest():
    assert choose_rule({"official": 0.8, "max": 0.8, "top_mean": 0.9, "calibrated": 0.9}) == "top_mean"
    assert choose_rule({"official": 0.7, "max": 0.7, "calibrated": float("nan")}) == "official"
    assert choose_rule({"official": 0.6, "calibrated_upper": 0.95}) == "calibrated_upper"


@pytest.mark.slow
def test_rule_chosen_on_validation_is_recorded_and_evaluate_reproduces_it(tmp_path, one_thread):
    from conftest import compose_cfg
    from texad.pipeline import evaluate, train

    over = [*TINY, "method=padim", "dataset.n_train=10", "dataset.n_val_good=6",
            "eval_callbacks.test_outputs.max_overlays_per_type=0"]
    record = train(compose_cfg("train", over, tmp_path / "a"))
    chosen = record["val"]["image_score"]
    assert chosen["calibration"]["source"] == "train_kfold"
    assert set(chosen["candidates"]) == {"official", "max", "top_mean", "calibrated", "calibrated_upper"}
    best = max(chosen["candidates"].values())
    assert chosen["candidates"][chosen["rule"]] == best
    assert record["val"]["image_auroc"] == pytest.approx(best)
    assert record["image_score"]["rule"] == chosen["rule"]
    by_rule = record["image_score"]["test_by_rule"]  # a report of every rule on test, chosen by none
    assert set(by_rule) == set(chosen["candidates"])
    assert by_rule[chosen["rule"]]["image_auroc"] == pytest.approx(record["image_auroc"])
    assert by_rule[chosen["rule"]]["image_f1_at_val"] == pytest.approx(record["image_f1_at_val"])
    state = torch.load(tmp_path / "a/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert state["image_scorer.stat_mean"].numel() == 6
    ev = evaluate(compose_cfg("evaluate", [f"ckpt_path={tmp_path}/a/checkpoints/last.ckpt", "logger=none"], tmp_path / "ev"))
    assert ev["image_score"]["rule"] == chosen["rule"]
    for key in ("image_auroc", "image_f1", "image_f1_at_val"):
        assert ev[key] == pytest.approx(record[key], abs=1e-9), key
    official = train(compose_cfg("train", [*over, "method.image_rule=official"], tmp_path / "b"))
    assert official["image_score"] == {"rule": "official", "setting": "official"}
    assert official["val"]["image_auroc"] == pytest.approx(chosen["candidates"]["official"])
