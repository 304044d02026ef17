"""python -m texad.tools.image_score_study: the image score rule chosen on validation only (issue 20, point 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY, run_entry
from sklearn.metrics import roc_auc_score

from texad.errors import TexadError
from texad.methods.components.image_score import image_score
from texad.tools import image_score_study as study


def test_rules_parse_and_bad_rules_name_the_flag():
    assert study.parse_rule("max") == ("max", 0.01)
    assert study.parse_rule("top_mean:0.05") == ("top_mean", 0.05)
    for bad in ("mean", "top_mean:2", "top_mean:x"):
        with pytest.raises(TexadError, match="--rules"):
            study.parse_rule(bad)


def planted_splits(seed: int = 0) -> dict:
    """Validation where one hot pixel marks a defect (the maximum separates, a broad top mean does not);
    test where normals carry a hot pixel and defects a broad rise (the opposite)."""
    g = torch.Generator().manual_seed(seed)
    n, side = 8, 16

    def split(hot_normals: bool, broad_defects: bool) -> dict:
        maps = torch.rand(2 * n, side, side, generator=g) * 0.5
        if hot_normals:
            maps[:n, 3, 3] = 1.0
        if broad_defects:
            maps[n:] += 0.3
        else:
            maps[n:, 5, 5] = 1.0
        labels = np.array([0] * n + [1] * n)
        return {"maps": maps, "labels": labels, "paths": [f"{i}.png" for i in range(2 * n)],
                "types": ["good"] * n + ["spot"] * n}

    return {"val": split(False, False), "test": split(True, True)}


@pytest.mark.parametrize("order", [("max", "top_mean:0.5"), ("top_mean:0.5", "max")])
def test_the_validation_best_rule_is_chosen_whatever_test_says(monkeypatch, order):
    splits = planted_splits()
    test_max = roc_auc_score(splits["test"]["labels"], image_score(splits["test"]["maps"], "max", 0.01).numpy())
    monkeypatch.setattr(study, "fused_maps", lambda run: (splits, ("max", 0.01), float(test_max)))
    record = study.study_run("planted", [study.parse_rule(r) for r in order])
    rows = {r["rule"]: r for r in record["rules"]}
    assert rows["max"]["val_image_auroc"] == 1.0 and rows["top_mean:0.5"]["val_image_auroc"] < 0.9
    assert rows["top_mean:0.5"]["test_image_auroc"] == 1.0 and rows["max"]["test_image_auroc"] == 0.0
    assert record["chosen"] == "max"  # best on validation, worst on test, first or last offered


@pytest.mark.slow
def test_study_chooses_on_validation_and_reproduces_the_run(tmp_path):
    run = tmp_path / "run"
    run_entry("train.py", "method=cfa", *TINY, "dataset.n_val_good=4", f"hydra.run.dir={run}")
    rules = [study.parse_rule(r) for r in ("max", "top_mean:0.05")]
    record = study.study_run(run, rules)  # raises if the run's own rule does not give its test AUROC
    assert record["own_test_image_auroc"] == json.loads((run / "metrics.json").read_text())["image_auroc"]
    by_val = max(record["rules"], key=lambda r: r["val_image_auroc"])
    assert record["chosen"] == by_val["rule"]  # validation chose; test figures only reported
    # the test AUROC per rule, recomputed independently with scikit-learn from the same maps
    splits, _, _ = study.fused_maps(run)
    for rule, row in zip(rules, record["rules"]):
        scores = image_score(splits["test"]["maps"], *rule).numpy()
        assert row["test_image_auroc"] == pytest.approx(roc_auc_score(splits["test"]["labels"], scores), abs=1e-9)
        low, high = row["test_image_auroc_ci95"]
        assert low <= row["test_image_auroc"] + 1e-9 and high >= row["test_image_auroc"] - 1e-9
    # the command line offers several rules, the validation-best last: it is still the one chosen
    offered = sorted((r["rule"] for r in record["rules"]), key=lambda r: r == record["chosen"])
    assert len(offered) >= 2 and offered[-1] == record["chosen"]
    val = {r["rule"]: r["val_image_auroc"] for r in record["rules"]}
    expected = next(r for r in offered if val[r] == max(val.values()))  # ties: the first offered
    assert study.main([str(run), "--rules", *offered, "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out/image_score_study.json").read_text())["runs"][0]["chosen"] == expected
