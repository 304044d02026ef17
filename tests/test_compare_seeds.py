"""texad.tools.compare ranks by validation and pools the seeds of a setting (issue 11, points 4-5)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from texad.tools.compare import is_test_metric, main as compare_main, summarize


def make_run(root: Path, num: int, overrides: dict[str, object], metrics: dict | None,
             optimized_metric: str = "val/pixel_aupr", seed: int = 0) -> Path:
    """A finished (or, with metrics None, failed) run dir as Hydra and train.py leave it."""
    run = root / str(num)
    (run / ".hydra").mkdir(parents=True)
    lines = [f"{k}={v}" for k, v in overrides.items()]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(lines))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": optimized_metric, "seed": seed}))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps({**metrics, "seed": seed}))
    return run


def test_default_ranking_is_the_runs_optimized_metric_not_test(tmp_path):
    # validation and test disagree on purpose: validation order a > b > c, test order c > b > a
    for num, (lr, val, test) in enumerate([("0.1", 0.9, 0.1), ("0.2", 0.5, 0.5), ("0.3", 0.2, 0.8)]):
        metrics = {"pixel_aupr": test, "pixel_auroc": test, "val": {"pixel_auroc": val, "pixel_aupr": 1 - val}}
        make_run(tmp_path, num, {"method.lr": lr}, metrics, optimized_metric="val/pixel_auroc")
    summary = summarize(tmp_path)
    assert summary.sort == "val/pixel_auroc"
    assert [r.overrides["method.lr"] for r in summary.runs] == ["0.1", "0.2", "0.3"]
    assert summary.metrics[0] == "val/pixel_auroc" and summary.metrics[1:3] == ["pixel_auroc", "pixel_aupr"]
    assert "seed" not in summary.metrics
    assert compare_main([str(tmp_path), "--no-plots"]) == 0
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["method.lr"] for r in rows] == ["0.1", "0.2", "0.3"]
    assert list(rows[0])[:4] == ["rank", "run", "method.lr", "val/pixel_auroc"]
    assert "(validation)" in (tmp_path / "summary.md").read_text()


def test_runs_without_a_config_rank_by_val_pixel_aupr(tmp_path):
    for num, (val, test) in enumerate([(0.3, 0.9), (0.7, 0.1)]):
        run = make_run(tmp_path, num, {"method.lr": num}, {"pixel_aupr": test, "val": {"pixel_aupr": val}})
        (run / ".hydra" / "config.yaml").unlink()
    assert [r.run for r in summarize(tmp_path).runs] == ["1", "0"]


def test_a_test_sort_key_is_allowed_with_a_warning(tmp_path, capsys):
    for num, (val, test) in enumerate([(0.9, 0.1), (0.1, 0.9)]):
        make_run(tmp_path, num, {"method.lr": num}, {"pixel_aupr": test, "val": {"pixel_aupr": val}})
    assert compare_main([str(tmp_path), "--no-plots", "--sort", "pixel_aupr"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "test metrics must not select" in err
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["method.lr"] for r in rows] == ["1", "0"]
    assert "a TEST metric" in (tmp_path / "summary.md").read_text()
    assert compare_main([str(tmp_path), "--no-plots", "--sort", "val/pixel_aupr"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert is_test_metric("image_f1_at_val") and is_test_metric("raw_nmi") and not is_test_metric("val/pixel_f1")
    assert not is_test_metric("wall_time_s")


def test_runs_differing_only_in_seed_are_pooled_into_mean_and_std(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    num = 0
    for sigma in ("2.0", "4.0"):
        vals, tests = [], []
        for seed in (0, 1, 2):
            val, test = float(rng.random()), float(rng.random())
            vals.append(val), tests.append(test)
            make_run(tmp_path, num, {"method.blur_sigma": sigma, "seed": seed},
                     {"pixel_aupr": test, "val": {"pixel_aupr": val}, "wall_time_s": 1.0 + seed}, seed=seed)
            num += 1
        expected[sigma] = (np.mean(vals), np.std(vals, ddof=1), np.mean(tests), np.std(tests, ddof=1))
    make_run(tmp_path, num, {"method.blur_sigma": "8.0", "seed": 0}, None)  # a failed run: its own setting
    assert compare_main([str(tmp_path), "--no-plots"]) == 0
    rows = list(csv.DictReader((tmp_path / "summary_seeds.csv").open()))
    assert [r["method.blur_sigma"] for r in rows[:2]] == sorted(expected, key=lambda s: -expected[s][0])
    assert rows[2]["method.blur_sigma"] == "8.0" and rows[2]["n_runs"] == "0" and rows[2]["pixel_aupr_mean"] == ""
    for row in rows[:2]:
        val_mean, val_std, test_mean, test_std = expected[row["method.blur_sigma"]]
        assert row["n_runs"] == "3" and row["seeds"] == "0 1 2"
        assert float(row["val/pixel_aupr_mean"]) == pytest.approx(val_mean, abs=1e-12)
        assert float(row["val/pixel_aupr_std"]) == pytest.approx(val_std, abs=1e-12)
        assert float(row["pixel_aupr_mean"]) == pytest.approx(test_mean, abs=1e-12)
        assert float(row["pixel_aupr_std"]) == pytest.approx(test_std, abs=1e-12)
        assert float(row["wall_time_s_mean"]) == pytest.approx(2.0)
    assert "seed" not in rows[0]  # not a column of the pooled table
    md = (tmp_path / "summary.md").read_text()
    assert "mean ± std over seeds" in md and f"{expected['2.0'][2]:.4f} ± {expected['2.0'][3]:.4f}" in md
    per_run = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(per_run) == 7 and "seed" in per_run[0]


def test_one_seed_per_setting_writes_no_pooled_table(tmp_path):
    for num in range(2):
        make_run(tmp_path, num, {"method.lr": num}, {"pixel_aupr": 0.5, "val": {"pixel_aupr": 0.5}})
    assert compare_main([str(tmp_path), "--no-plots"]) == 0
    assert not (tmp_path / "summary_seeds.csv").exists()
    assert "over seeds" not in (tmp_path / "summary.md").read_text()
