"""A real multirun (2 settings x 2 seeds) leaves summary.csv and summary_seeds.csv at its root, ranked by
validation; texad.tools.compare tabulates and plots it."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, run_entry

from texad.tools.compare import main as compare_main
from texad.tools.compare import parse_override, swept_parameters, RunRecord


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "multirun"
    overrides = [o for o in TINY if not o.startswith("method.epochs")]
    run_entry("train.py", "-m", *overrides, "method.epochs=1", f"hydra.sweep.dir={out}",
              "eval_callbacks.test_outputs.max_overlays_per_type=1", "method.blur_sigma=2.0,4.0", "seed=0,1")
    return out


@pytest.mark.slow
def test_summary_csv_has_one_row_per_run_ranked_by_validation(sweep_dir):
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert len(rows) == 4
    assert sorted(float(r["method.blur_sigma"]) for r in rows) == [2.0, 2.0, 4.0, 4.0]
    assert "dataset.image_size" not in rows[0]  # fixed overrides are not columns
    for key in ("pixel_aupr", "pixel_aupro", "image_auroc", "val/pixel_aupr"):
        assert all(r[key] != "" for r in rows), key
    assert list(rows[0])[:5] == ["rank", "run", "method.blur_sigma", "seed", "val/pixel_aupr"]
    values = [float(r["val/pixel_aupr"]) for r in rows]
    assert values == sorted(values, reverse=True)  # best first by train.yaml's optimized_metric
    assert {r["run"] for r in rows} == {"0", "1", "2", "3"}


@pytest.mark.slow
def test_summary_pools_the_seeds_of_each_setting(sweep_dir):
    runs = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    rows = list(csv.DictReader((sweep_dir / "summary_seeds.csv").open()))
    assert len(rows) == 2 and all(r["n_runs"] == "2" for r in rows)
    for row in rows:
        mine = [float(r["pixel_aupr"]) for r in runs if r["method.blur_sigma"] == row["method.blur_sigma"]]
        assert float(row["pixel_aupr_mean"]) == pytest.approx(sum(mine) / 2, abs=1e-12)
        assert float(row["pixel_aupr_std"]) == pytest.approx(abs(mine[0] - mine[1]) / 2 ** 0.5, abs=1e-12)
    means = [float(r["val/pixel_aupr_mean"]) for r in rows]
    assert means == sorted(means, reverse=True)


@pytest.mark.slow
def test_compare_cli_writes_table_and_plots(sweep_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "texad.tools.compare", str(sweep_dir), "--out", str(tmp_path),
                           "--sort", "pixel_auroc"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "test metrics must not select" in proc.stderr  # a test key is allowed, with a warning
    assert "| method.blur_sigma |" in proc.stdout
    md = (tmp_path / "summary.md").read_text()
    assert md.count("\n| ") == (1 + 2) + (1 + 4) and "best first by `pixel_auroc`, a TEST metric" in md
    plots = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert "pixel_aupr__method.blur_sigma.png" in plots and "pixel_aupro__method.blur_sigma.png" in plots
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    scores = [float(r["pixel_auroc"]) for r in rows]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.slow
def test_compare_errors_on_empty_dir(tmp_path):
    assert compare_main([str(tmp_path)]) == 1


@pytest.mark.slow
def test_failed_run_is_listed_last(tmp_path):
    for num, (value, metrics) in enumerate([("0.1", None), ("0.2", '{"pixel_aupr": 0.3, "val": {"pixel_aupr": 0.4}}')]):
        run = tmp_path / str(num)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- method.lr={value}\n- seed=1\n")
        if metrics:
            (run / "metrics.json").write_text(metrics)
    assert compare_main([str(tmp_path), "--no-plots"]) == 0
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["method.lr"] for r in rows] == ["0.2", "0.1"]
    assert rows[1]["status"] == "no metrics.json" and rows[1]["pixel_aupr"] == ""


def test_override_parsing():
    assert parse_override("+a.b=[1,2]") == ("a.b", "[1,2]")
    assert parse_override("~a") is None
    runs = [RunRecord("0", {"x": "1", "y": "a"}), RunRecord("1", {"x": "2", "y": "a"})]
    assert swept_parameters(runs) == (["x"], {"y": "a"})
