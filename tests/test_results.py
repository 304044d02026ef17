"""python -m texad.tools.results: real runs end to end at a tiny size, resumable, table numbers equal to the runs'
metrics.json (mean and std recomputed here with numpy), rows never ranked by a test metric (issue 11, point 7)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT

from texad.tools import results

TINY_ARGS = [
    "--sets", "textures/brick", "--seeds", "0", "--size", "64", "--n-train", "6", "--epochs", "1",
    "--override", "dataset.n_test_good=2", "--override", "dataset.n_per_type=2",
]


def run_results(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "texad.tools.results", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def read_rows(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "results.csv").open()))


def assert_row_equals_runs(row: dict[str, str], records: list[dict], walls: list[float]) -> None:
    """Every *_mean / *_std of the row equals numpy's mean / sample std (ddof 1) of the runs' metrics.json."""
    checked = 0
    for column, cell in row.items():
        if not column.endswith("_mean") or column == "wall_time_s_mean":
            continue
        key = column[: -len("_mean")]
        values = [r["val"].get(key[4:]) if key.startswith("val/") else r.get(key) for r in records]
        values = [v for v in values if v is not None]
        if not values:
            assert cell == "" and row[f"{key}_std"] == ""
            continue
        assert float(cell) == pytest.approx(float(np.mean(values)), abs=1e-12), key
        std = row[f"{key}_std"]
        if len(values) > 1:
            assert float(std) == pytest.approx(float(np.std(values, ddof=1)), abs=1e-12), key
        else:
            assert std == ""  # undefined for one seed
        checked += 1
    assert checked >= 6
    assert float(row["wall_time_s_mean"]) == pytest.approx(float(np.mean(walls)), abs=1e-9)


@pytest.mark.slow
def test_results_end_to_end_tiny(tmp_path):
    out = tmp_path / "results"
    # two runs at a time, one thread each (the table's default on a 2-core machine)
    proc = run_results(*TINY_ARGS, "--methods", "cfa", "spcfa", "no_such_method", "--out", str(out), "--jobs", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipped method no_such_method: conf/method/no_such_method.yaml does not exist" in proc.stdout
    assert "| val/pixel_aupr (selection) |" in proc.stdout and "## textures/brick" in proc.stdout
    rows = read_rows(out)
    assert [(r["method"], r["set"], r["n_seeds"], r["seeds"]) for r in rows] == [
        ("cfa", "textures/brick", "1", "0"), ("spcfa", "textures/brick", "1", "0")]  # table order, not ranked
    assert all(r["selection_metric"] == "val/pixel_aupr" for r in rows)
    runs = out / "runs"
    cfa_dir, spcfa_dir = runs / "cfa/textures/brick/seed0", runs / "spcfa/textures/brick/seed0"
    cfa = json.loads((cfa_dir / "metrics.json").read_text())
    spcfa_train = json.loads((spcfa_dir / "metrics.json").read_text())
    spcfa = json.loads((spcfa_dir / "evaluate/metrics.json").read_text())  # α re-fused on validation
    assert spcfa["fusion"]["metric"] == "pixel_aupr" and "alpha" in spcfa["fusion"]
    assert_row_equals_runs(rows[0], [cfa], [cfa["wall_time_s"]])
    # the selected epoch and fit time only train.py knows: the row takes them from its record
    merged = {**spcfa, **{k: spcfa_train[k] for k in results.FIT_KEYS if k in spcfa_train and k not in spcfa}}
    assert "selected_epoch" in merged and "fit_time_s" in merged
    assert_row_equals_runs(rows[1], [merged], [spcfa_train["wall_time_s"] + spcfa["wall_time_s"]])
    per_run = {r["method"]: r for r in csv.DictReader((out / "runs.csv").open())}
    # runs.csv: a run's wall time is train.py's plus the evaluate step's (not the step's own, as it once was)
    assert float(per_run["spcfa"]["wall_time_s"]) == pytest.approx(spcfa_train["wall_time_s"] + spcfa["wall_time_s"])
    assert float(per_run["cfa"]["wall_time_s"]) == pytest.approx(cfa["wall_time_s"])
    plan = json.loads((out / "plan.json").read_text())
    assert plan["jobs"] == 2 and plan["threads_per_run"] >= 1
    overrides = yaml.safe_load((cfa_dir / ".hydra/overrides.yaml").read_text())
    assert {"dataset.image_size=64", "dataset.generated_size=64", "dataset.n_train=6", "method.epochs=1"} <= set(overrides)
    assert plan["seeds"] == [0] and [m["name"] for m in plan["methods"]] == ["cfa", "spcfa"]

    # resume: every run has its metrics.json, so nothing runs again and the table is the same
    before = (out / "results.csv").read_text()
    again = run_results(*TINY_ARGS, "--methods", "cfa", "spcfa", "--out", str(out), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(metrics.json from before") == 2
    assert (out / "results.csv").read_text() == before

    # a run dir made with other settings is never mixed in
    other = run_results(*TINY_ARGS[:-4], "--methods", "cfa", "--size", "32", "--out", str(out), timeout=300)
    assert other.returncode == 1 and "was made with other overrides" in other.stderr


def fake_run(plan: results.Plan, entry: results.MethodEntry, set_name: str, seed: int, record: dict,
             optimized_metric: str) -> None:
    """A finished run dir exactly as train.py leaves it for this plan (so the command reuses it)."""
    run_dir = results.run_dir_of(plan, entry.name, set_name, seed)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra/overrides.yaml").write_text(yaml.safe_dump(results.train_overrides(plan, entry, set_name, seed)))
    (run_dir / ".hydra/config.yaml").write_text(yaml.safe_dump({"optimized_metric": optimized_metric, "seed": seed}))
    (run_dir / "metrics.json").write_text(json.dumps(record))


def test_mean_and_std_over_seeds_and_rows_in_table_order(tmp_path):
    args = ["--sets", "textures/brick", "textures/grass", "--seeds", "0", "1", "2", "--methods", "cfa", "fca",
            "--out", str(tmp_path)]
    plan = results.make_plan(results.parse_args(args))
    rng = np.random.default_rng(0)
    records: dict[tuple[str, str], list[dict]] = {}
    for entry in plan.methods:
        for set_name in plan.sets:
            for seed in results.seeds_of(plan, entry):  # fca is deterministic: it runs seed 0 only
                # fca's test numbers are all higher than cfa's: the rows must still follow the table order
                base = 0.5 if entry.name == "fca" else 0.0
                record = {k: base + 0.5 * float(rng.random()) for k in ("pixel_auroc", "pixel_aupro", "pixel_aupr",
                                                                         "pixel_f1", "image_auroc", "image_f1")}
                record.update(val={"pixel_aupr": float(rng.random()), "pixel_auroc": float(rng.random())},
                              seed=seed, wall_time_s=float(rng.uniform(1, 9)), image_f1_at_val=None)
                fake_run(plan, entry, set_name, seed, record, "val/pixel_auroc")
                records.setdefault((entry.name, set_name), []).append(record)
    assert results.main(args) == 0
    rows = read_rows(tmp_path)
    assert [(r["method"], r["set"]) for r in rows] == [
        ("cfa", "textures/brick"), ("cfa", "textures/grass"), ("fca", "textures/brick"), ("fca", "textures/grass")]
    for row in rows:
        recs = records[(row["method"], row["set"])]
        assert row["n_seeds"] == ("1" if row["method"] == "fca" else "3")
        assert row["selection_metric"] == "val/pixel_auroc"
        assert_row_equals_runs(row, recs, [r["wall_time_s"] for r in recs])
    md = (tmp_path / "results.md").read_text()
    assert "| val/pixel_auroc (selection) |" in md and "image_f1_at_val" not in md  # absent everywhere: no column
    first = records[("cfa", "textures/brick")]
    mean, std = np.mean([r["pixel_aupr"] for r in first]), np.std([r["pixel_aupr"] for r in first], ddof=1)
    assert f"{mean:.3f} ± {std:.3f}" in md
    compact = (tmp_path / "compact.md").read_text().splitlines()  # the README's table: five metrics, narrow
    assert compact[0] == "| set | method | n | P-AUROC | AUPRO | P-AP | P-F1 | I-AUROC |" and len(compact) == 2 + 4
    assert max(len(line) for line in compact) <= 120
    assert f"| brick | cfa | 3 | {np.mean([r['pixel_auroc'] for r in first]):.3f} ± " in compact[2]


def test_collect_tabulates_finished_runs_and_runs_nothing(tmp_path):
    args = ["--sets", "textures/brick", "--seeds", "0", "1", "--methods", "cfa", "fca", "--out", str(tmp_path)]
    assert results.main([*args[:-2], "--collect", "--out", str(tmp_path / "nothing")]) == 1  # no runs there: error
    plan = results.make_plan(results.parse_args(args))
    cfa, fca = plan.methods
    done = [{"pixel_aupr": 0.3 + 0.1 * seed, "val": {"pixel_aupr": 0.2}, "seed": seed, "wall_time_s": 5.0}
            for seed in (0, 1)]
    for seed in (0, 1):
        fake_run(plan, cfa, "textures/brick", seed, done[seed], "val/pixel_aupr")
    # fca (deterministic: seed 0 only) has started (its run dir exists) but not finished
    assert results.seeds_of(plan, fca) == [0]
    (results.run_dir_of(plan, "fca", "textures/brick", 0) / ".hydra").mkdir(parents=True)
    assert results.main([*args, "--collect"]) == 0
    assert not (tmp_path / "plan.json").exists()  # --collect records no plan of its own
    for seed in (0, 1):  # nothing was run
        assert not (results.run_dir_of(plan, "fca", "textures/brick", seed) / "metrics.json").exists()
    rows = read_rows(tmp_path)
    assert [(r["method"], r["n_seeds"], r["failed"]) for r in rows] == [("cfa", "2", "0"), ("fca", "0", "1")]
    assert float(rows[0]["pixel_aupr_mean"]) == pytest.approx(0.35)
    md = (tmp_path / "results.md").read_text()
    assert "fca textures/brick seed 0: not run yet" in md and "fca textures/brick seed 1" not in md


def test_overrides_per_method_and_errors(tmp_path):
    common, per = results.split_overrides(["a.b=1", "cfa:method.k=5", "dataset.root=/x:y"])
    assert common == ["a.b=1", "dataset.root=/x:y"] and per == {"cfa": ["method.k=5"]}
    with pytest.raises(results.TexadError, match="METHOD:KEY=VALUE"):
        results.split_overrides(["nonsense"])
    with pytest.raises(results.TexadError, match="not run"):
        results.make_plan(results.parse_args(["--methods", "cfa", "--override", "fca:method.x=1", "--out", str(tmp_path)]))
    with pytest.raises(results.TexadError, match="texture sets"):
        results.size_overrides("mvtec/wood", None, 10)
    assert results.size_overrides("mvtec/wood", 128, None) == ["dataset.image_size=128"]


def test_parallel_runs_keep_plan_order_cap_threads_and_stop_cleanly(tmp_path, monkeypatch):
    """--jobs: results in the plan's order whatever finishes first; each run's OMP/MKL threads capped; an
    interrupted command kills its runs in progress and starts no other."""
    plan = results.make_plan(results.parse_args(
        ["--sets", "textures/brick", "--seeds", "0", "1", "2", "3", "--methods", "cfa", "--jobs", "3",
         "--out", str(tmp_path)]))
    assert plan.jobs == 3 and plan.threads == max(1, (os.cpu_count() or 1) // 3)
    delays = {0: 0.6, 1: 0.0, 2: 0.3, 3: 0.1}

    def fake_one(plan_, entry, set_name, seed, collect=False):
        time.sleep(delays[seed])
        return results.RunResult(entry.name, set_name, seed, tmp_path, "ok", {"pixel_aupr": seed / 10})

    monkeypatch.setattr(results, "run_one", fake_one)
    lines: list[str] = []
    got = results.run_plan(plan, log=lines.append)
    assert [r.seed for r in got] == [0, 1, 2, 3] and len(lines) == 4
    assert lines[0].startswith("[1/4] cfa textures/brick seed 1")  # logged as they finish

    code = [sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'])"]
    status, last = results._subprocess(code, tmp_path / "env.log", threads=1)
    assert status == 0 and last == "1 1"

    # stopping: a long run in progress is killed, and no run starts after it
    box: dict[str, tuple[int, str]] = {}
    worker = threading.Thread(target=lambda: box.update(
        run=results._subprocess([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "stop.log")))
    started = time.time()
    worker.start()
    while not results._LIVE and time.time() - started < 20:
        time.sleep(0.05)
    results._stop_live_runs()
    worker.join(timeout=20)
    assert not worker.is_alive() and box["run"][0] != 0 and time.time() - started < 30
    with pytest.raises(SystemExit, match="stopping"):
        results._subprocess(code, tmp_path / "after.log")
    results._STOPPING.clear()
