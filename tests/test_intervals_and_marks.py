"""Bootstrap intervals of seed groups, the validation/test rank correlation, `compare --paired` and the results
table's **best** / ≈ marks, each against an independent computation or a case whose answer is known."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from texad.metrics.bootstrap import (
    STATISTICS_FILE,
    TestStatistics,
    collect_statistics,
    group_intervals,
    intervals,
    rank_correlation_interval,
    replicate_weights,
)
from texad.tools import compare, results

N_NORMAL, N_DEFECTIVE = 12, 8


def image_stats(scores: np.ndarray, order: np.ndarray | None = None) -> TestStatistics:
    """Image-level statistics of one run (labels: N_NORMAL normals, then defects), optionally reordered."""
    labels = np.array([0] * N_NORMAL + [1] * N_DEFECTIVE)
    paths = [f"img{i:02d}.png" for i in range(labels.size)]
    types = ["good" if y == 0 else ("crack" if i % 2 else "stain") for i, y in enumerate(labels)]
    stats = TestStatistics(paths=paths, labels=labels, defect_types=types, scores=np.asarray(scores, dtype=float))
    return stats if order is None else stats.reordered(order)


def test_group_intervals_equal_a_loop_over_replicates_with_scikit_learn():
    rng = np.random.default_rng(0)
    labels = np.array([0] * N_NORMAL + [1] * N_DEFECTIVE)
    runs = [rng.normal(size=labels.size) + 0.8 * labels for _ in range(2)]
    shuffled = rng.permutation(labels.size)  # the second run lists its images in another order
    got = group_intervals([image_stats(runs[0]), image_stats(runs[1], shuffled)], n=200, seed=3)["image_auroc"]
    weights = replicate_weights(labels, 200, 3)  # the draw (normals and defects apart), shared by both runs
    means = []
    for w in weights:
        counts = w.astype(int)
        aurocs = [roc_auc_score(np.repeat(labels, counts), np.repeat(s, counts)) for s in runs]
        means.append(np.mean(aurocs))
    assert got == pytest.approx([np.percentile(means, 2.5), np.percentile(means, 97.5)], abs=1e-12)
    assert intervals(image_stats(runs[0]), n=200, seed=3) == group_intervals([image_stats(runs[0])], n=200, seed=3)


def pixel_stats(signal: float, noise: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> TestStatistics:
    maps = noise + signal * masks
    paths = [f"p{i}.png" for i in range(len(labels))]
    types = ["good" if y == 0 else "spot" for y in labels.tolist()]
    return collect_statistics(maps.flatten(1).amax(1), labels, paths, types, maps, masks)


def test_rank_correlation_interval_of_known_orders():
    """Three settings whose pixel AUROC rises with a signal on validation: ρ is +1 in every replicate when test
    ranks them alike, −1 when test ranks them in reverse; fewer than three settings give no interval."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 6 + [1] * 6)
    masks = torch.zeros(12, 8, 8)
    masks[6:, 2:5, 2:5] = 1.0
    val_noise, test_noise = torch.rand(12, 8, 8, generator=g), torch.rand(12, 8, 8, generator=g)
    signals = [0.05, 0.3, 2.0]
    val = [pixel_stats(s, val_noise, masks, labels) for s in signals]
    alike = [pixel_stats(s, test_noise, masks, labels) for s in signals]
    reverse = alike[::-1]
    assert rank_correlation_interval(list(zip(val, alike)), "pixel_auroc", n=100) == pytest.approx([1.0, 1.0])
    assert rank_correlation_interval(list(zip(val, reverse)), "pixel_auroc", n=100) == pytest.approx([-1.0, -1.0])
    assert rank_correlation_interval(list(zip(val[:2], alike[:2])), "pixel_auroc") is None


def test_compare_paired_reports_a_minus_b_and_whether_it_differs(tmp_path, capsys):
    rng = np.random.default_rng(1)
    labels = np.array([0] * N_NORMAL + [1] * N_DEFECTIVE)
    good = labels + 0.1 * rng.random(labels.size)  # separates perfectly
    noise = rng.random(labels.size)  # does not
    for name, scores in (("a", good), ("b", noise)):
        (tmp_path / name).mkdir()
        image_stats(scores).save(tmp_path / name / STATISTICS_FILE)
    assert compare.main(["--paired", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")]) == 0
    with open(tmp_path / "ab" / "paired.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["metric"] == "image_auroc")
    a, b = roc_auc_score(labels, good), roc_auc_score(labels, noise)
    assert float(row["a"]) == pytest.approx(a) and float(row["b"]) == pytest.approx(b)
    assert float(row["difference"]) == pytest.approx(a - b)
    assert float(row["low"]) > 0 and row["excludes_zero"] == "True"
    assert "| image_auroc |" in (tmp_path / "ab" / "paired.md").read_text()
    # a run against itself: no difference, and no claim that it differs
    assert compare.main(["--paired", str(tmp_path / "b"), str(tmp_path / "b"), "--out", str(tmp_path / "bb")]) == 0
    with open(tmp_path / "bb" / "paired.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["metric"] == "image_auroc")
    assert float(row["difference"]) == 0.0 and row["excludes_zero"] == "False"


def test_results_table_marks_the_best_and_the_rows_its_interval_cannot_tell_apart(tmp_path):
    """cfa separates the test images perfectly, patchcore nearly as well (intervals overlap: ≈), fca at random
    (its interval lies below: unmarked); the marks come from the runs' test_statistics.npz."""
    args = ["--sets", "textures/brick", "--seeds", "0", "--methods", "cfa", "patchcore", "fca", "--out", str(tmp_path)]
    plan = results.make_plan(results.parse_args(args))
    labels = np.array([0] * N_NORMAL + [1] * N_DEFECTIVE)
    rng = np.random.default_rng(2)
    near = labels + 0.1 * rng.random(labels.size)
    near[0] = 1.05  # one normal image above every defect
    scores = {"cfa": labels + 0.1 * rng.random(labels.size), "patchcore": near, "fca": rng.random(labels.size)}
    for entry in plan.methods:
        run_dir = results.run_dir_of(plan, entry.name, "textures/brick", 0)
        (run_dir / ".hydra").mkdir(parents=True)
        overrides = results.train_overrides(plan, entry, "textures/brick", 0)
        (run_dir / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
        (run_dir / ".hydra/config.yaml").write_text(yaml.safe_dump({"optimized_metric": "val/pixel_aupr", "seed": 0}))
        record = {"image_auroc": roc_auc_score(labels, scores[entry.name]), "val": {"pixel_aupr": 0.5}, "seed": 0,
                  "wall_time_s": 1.0}
        (run_dir / "metrics.json").write_text(json.dumps(record))
        image_stats(scores[entry.name]).save(run_dir / STATISTICS_FILE)
    assert results.main([*args, "--collect"]) == 0
    lines = {line.split("|")[1].strip(): line for line in (tmp_path / "results.md").read_text().splitlines()
             if line.startswith("| ") and line.split("|")[1].strip() in ("cfa", "patchcore", "fca")}
    cells = {m: [c.strip() for c in line.split("|")] for m, line in lines.items()}
    column = [c.strip() for c in next(line for line in (tmp_path / "results.md").read_text().splitlines()
                                       if line.startswith("| method")).split("|")].index("image_auroc")
    assert cells["cfa"][column].startswith("**1.000") and cells["cfa"][column].endswith("**")
    assert cells["patchcore"][column].endswith(" ≈") and "**" not in cells["patchcore"][column]
    assert not cells["fca"][column].endswith("≈") and "**" not in cells["fca"][column]
