"""Every test run leaves maps, overlays, curves and scores in its run dir (issue 6, point 2)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_entry

from texad.metrics.functional import average_precision
from texad.viz import overlay_figure, pr_figure, save_figure

CAP = 1  # overlays per defect type


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outputs") / "run"
    overrides = [o for o in TINY if not o.startswith("method.epochs")]
    run_entry("train.py", *overrides, "method.epochs=1", f"hydra.run.dir={out}",
              f"eval_callbacks.test_outputs.max_overlays_per_type={CAP}")
    return out


@pytest.mark.slow
def test_maps_complete_float16_and_named_like_inputs(run_dir):
    rows = list(csv.DictReader((run_dir / "scores.csv").open()))
    maps = sorted(run_dir.glob("maps/*/*.npz"))
    assert len(maps) == len(rows) > 0  # one map per test image, whatever the overlay cap
    for row in rows:
        path = run_dir / row["map"]
        assert path.parent.name == row["defect_type"]
        assert path.stem == Path(row["path"]).stem
        with np.load(path) as data:
            amap = data["anomaly_map"]
            assert amap.dtype == np.float16 and amap.shape == (64, 64)
            assert float(data["pred_score"]) == pytest.approx(float(row["pred_score"]))
            # CFA's default image score is the mean of the top 1 % of its map (method.image_score=top_mean)
            top = np.sort(amap.astype(np.float64).ravel())[::-1][: max(1, round(0.01 * amap.size))]
            assert top.mean() == pytest.approx(float(row["pred_score"]), rel=1e-3)
    assert {r["label"] for r in rows} == {"0", "1"}


@pytest.mark.slow
def test_overlays_capped_per_type(run_dir):
    types = {p.name for p in (run_dir / "maps").iterdir()}
    overlays = sorted(run_dir.glob("overlays/*/*.png"))
    assert {p.parent.name for p in overlays} == types
    for t in types:
        assert len(list((run_dir / "overlays" / t).glob("*.png"))) == CAP
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in overlays)


@pytest.mark.slow
def test_curves_written(run_dir):
    for name in ("pr.png", "pro.png"):
        assert (run_dir / "curves" / name).stat().st_size > 5_000


@pytest.mark.slow
def test_metrics_json_still_written(run_dir):
    record = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= record["pixel_aupr"] <= 1.0


@pytest.mark.slow
def test_evaluate_writes_outputs_in_its_own_dir(run_dir, tmp_path):
    out = tmp_path / "eval"
    # no writer overrides: conf/evaluate.yaml carries the writer, as users run it
    run_entry("evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={out}",
              "logger=none")
    assert len(list(out.glob("maps/*/*.npz"))) == len(list(run_dir.glob("maps/*/*.npz")))
    assert (out / "curves" / "pr.png").is_file() and list(out.glob("overlays/*/*.png"))
    a = json.loads((run_dir / "metrics.json").read_text())["pixel_aupr"]
    b = json.loads((out / "metrics.json").read_text())["pixel_aupr"]
    assert b == pytest.approx(a, rel=1e-5)


def test_evaluate_yaml_wires_the_same_writer_as_train_yaml():
    """evaluate.py writes the same outputs as train.py without extra overrides: one writer config."""
    from omegaconf import OmegaConf

    conf_dir = Path(__file__).resolve().parents[1] / "conf"
    train = OmegaConf.load(conf_dir / "train.yaml").eval_callbacks
    evaluate = OmegaConf.load(conf_dir / "evaluate.yaml").eval_callbacks
    writers = [name for name, c in evaluate.items() if c.get("_target_") == "texad.writers.TestOutputWriter"]
    assert writers == ["test_outputs"]
    writer = OmegaConf.to_container(evaluate.test_outputs)  # unresolved: ${...} stay text
    assert writer == OmegaConf.to_container(train.test_outputs)
    assert writer["output_dir"] == "${paths.output_dir}"


def test_pr_figure_and_overlay_render(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True
    amap = rng.random((32, 32)).astype(np.float32) + mask
    assert average_precision(amap, mask) > 0.5
    image = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    fig = overlay_figure(image, amap, score=float(amap.max()), title="t/0", label=1, defect_type="t", mask=mask,
                         threshold=1.0, value_range=(0.0, 2.0))
    assert "score = " in fig._suptitle.get_text() and "anomalous (t)" in fig._suptitle.get_text()
    assert save_figure(fig, tmp_path / "o.png").stat().st_size > 1000
    fig = pr_figure(np.array([1.0, 0.5]), np.array([0.5, 1.0]), ap=0.75, prevalence=0.1)
    assert "AP = 0.750" in fig.axes[0].get_title()
    save_figure(fig, tmp_path / "pr.png")
