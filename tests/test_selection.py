"""Epoch selection on validation, F1 at the validation threshold, and image scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from conftest import TINY, run_entry
from texad.errors import TexadError
from texad.metrics.functional import f1_at_threshold
from texad.methods.components.image_score import image_score
from texad.pipeline import train

KEYS = ("pixel_auroc", "pixel_aupro", "pixel_aupr", "pixel_f1", "image_auroc", "image_f1")


@pytest.mark.parametrize("seed", range(4))
def test_f1_at_threshold_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 20, 500).astype(np.float32) / 4  # many ties
    targets = rng.random(500) < 0.3
    for threshold in (-1.0, 0.0, 1.25, 2.5, float(scores.max()), 100.0):
        expected = f1_score(targets, scores >= threshold, zero_division=0.0)
        assert f1_at_threshold(torch.from_numpy(scores), torch.from_numpy(targets), threshold) == pytest.approx(expected)
    assert np.isnan(f1_at_threshold(scores, np.zeros(500, bool), 1.0))


def test_image_score_rules():
    maps = torch.zeros(2, 10, 10)
    maps[0, 0, 0] = 10.0  # one extreme pixel
    maps[1, 4:6, 4:6] = 3.0  # a small hot region
    assert image_score(maps, "max").tolist() == [10.0, 3.0]
    top = image_score(maps, "top_mean", 0.04)  # the 4 hottest pixels
    assert top.tolist() == pytest.approx([2.5, 3.0])
    assert image_score(maps, "top_mean", 1e-9).tolist() == [10.0, 3.0]  # at least one pixel
    with pytest.raises(TexadError, match="method.image_score must be one of"):
        image_score(maps, "median")
    with pytest.raises(TexadError, match="image_score_fraction"):
        image_score(maps, "top_mean", 0.0)


@pytest.mark.slow
def test_the_validation_selected_epoch_is_tested_and_recorded(tmp_path):
    run = tmp_path / "run"
    run_entry("train.py", *TINY, "method.epochs=3", "dataset.n_train=10", f"hydra.run.dir={run}")
    record = json.loads((run / "metrics.json").read_text())
    curve = record["val_curve"]
    assert [p["epoch"] for p in curve] == [1, 2, 3]
    values = [p["val/pixel_aupr"] for p in curve]
    assert record["selected_epoch"] == 1 + int(np.argmax(values))  # first best on ties, as ModelCheckpoint
    assert record["selection"]["best_value"] == pytest.approx(max(values), abs=1e-6)
    # the test metrics are those of the selected weights: evaluating best.ckpt gives them again
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    ev = tmp_path / "eval"
    run_entry("evaluate.py", f"ckpt_path={run}/checkpoints/best.ckpt", f"hydra.run.dir={ev}", "logger=none")
    again = json.loads((ev / "metrics.json").read_text())
    for key in KEYS:
        assert again[key] == pytest.approx(record[key], abs=1e-6), key
    # validation thresholds carried to the test split
    assert record["pixel_f1_at_val"] is not None and record["image_f1_at_val"] is not None
    assert record["pixel_f1_at_val"] <= record["pixel_f1"] + 1e-9


@pytest.mark.slow
def test_selection_can_be_switched_off_and_rejects_a_test_metric(tiny_cfg):
    record = train(tiny_cfg("method.epochs=1", "selection.every_n_epochs=0"))
    assert "selected_epoch" not in record
    with pytest.raises(TexadError, match="optimized_metric must be a validation metric"):
        train(tiny_cfg("method.epochs=1", "optimized_metric=pixel_aupr"))
