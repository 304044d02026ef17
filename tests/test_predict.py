"""predict.py on a folder of new images of any size, with unreadable files skipped and listed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import TINY, run_entry


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "run"
    overrides = [o for o in TINY if not o.startswith("method.epochs")]
    run_entry("train.py", *overrides, "method.epochs=1", f"hydra.run.dir={out}",
              "eval_callbacks.test_outputs.max_overlays_per_type=1")
    return out


@pytest.fixture
def inputs(tmp_path) -> Path:
    folder = tmp_path / "new"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "wide.png"), (rng.random((48, 100, 3)) * 255).astype(np.uint8))
    cv2.imwrite(str(folder / "sub" / "gray.jpg"), (rng.random((80, 80)) * 255).astype(np.uint8))
    (folder / "broken.png").write_bytes(b"definitely not a png")
    (folder / "readme.txt").write_text("not an image")
    return folder


@pytest.mark.slow
def test_predict_folder(trained, inputs, tmp_path):
    out = tmp_path / "pred"
    proc = run_entry("predict.py", f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", f"input_dir={inputs}",
                     f"hydra.run.dir={out}")
    assert "predict" in proc.stderr  # tqdm progress bar
    rows = {r["path"]: r for r in csv.DictReader((out / "scores.csv").open())}
    assert set(rows) == {"wide.png", "sub/gray.jpg"}
    for name, (h, w) in {"wide": (48, 100), "sub/gray": (80, 80)}.items():
        with np.load(out / "maps" / f"{name}.npz") as data:
            assert data["anomaly_map"].shape == (h, w) and data["anomaly_map"].dtype == np.float16
        mask = cv2.imread(str(out / "masks" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        assert (out / "overlays" / f"{name}.png").is_file()
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in skipped) == ["broken.png", "readme.txt"]
    record = json.loads((out / "prediction.json").read_text())
    val = json.loads((trained / "metrics.json").read_text())["val"]
    assert record["pixel"] == pytest.approx(val["pixel_f1_threshold"])  # validation, never test
    assert record["n_images"] == 2 and record["n_skipped"] == 2


@pytest.mark.slow
def test_predict_given_threshold_sets_masks(trained, inputs, tmp_path):
    out = tmp_path / "pred"
    run_entry("predict.py", f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", f"input_dir={inputs}",
              f"hydra.run.dir={out}", "threshold=-1e9", "max_overlays=0")
    mask = cv2.imread(str(out / "masks" / "wide.png"), cv2.IMREAD_GRAYSCALE)
    assert (mask == 255).all()  # every pixel is above a threshold below every score
    assert not (out / "overlays").exists()
    assert json.loads((out / "prediction.json").read_text())["pixel_source"] == "given"


@pytest.mark.slow
def test_predict_missing_checkpoint_is_one_line_error(inputs, tmp_path):
    proc = run_entry("predict.py", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"input_dir={inputs}",
                     f"hydra.run.dir={tmp_path / 'p'}", check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr


def test_maps_go_back_to_the_image_size_through_geometry_resample():
    """Same as the bilinear half-pixel resize it replaces (cv2.INTER_LINEAR), up and down."""
    from texad.predictor import to_image_size

    amap = np.random.default_rng(0).random((16, 24)).astype(np.float32)
    for h, w in ((48, 100), (16, 24), (8, 10), (37, 53)):
        ours = to_image_size(amap, (h, w))
        assert ours.shape == (h, w)
        if (h, w) != amap.shape and h >= 16 and w >= 24:  # upsampling: both sample bilinearly at pixel centres
            np.testing.assert_allclose(ours, cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR), atol=1e-5)
    assert to_image_size(amap, (16, 24)) is amap


@pytest.mark.slow
def test_interrupted_predict_resumes_where_it_stopped(trained, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        cv2.imwrite(str(folder / f"{i:03d}.png"), (rng.random((40, 56, 3)) * 255).astype(np.uint8))
    out = tmp_path / "pred"
    args = [f"ckpt_path={trained}", f"input_dir={folder}", f"hydra.run.dir={out}", "batch_size=4", "max_overlays=0"]
    run_entry("predict.py", *args)
    whole = (out / "scores.csv").read_text()
    done = {p: p.stat().st_mtime_ns for p in (out / "maps").iterdir()}
    for name in ("008", "009", "010", "011"):  # as if stopped after two batches: the last batch not written
        (out / "maps" / f"{name}.npz").unlink()
        (out / "masks" / f"{name}.png").unlink(missing_ok=True)
    (out / "scores.csv").unlink()
    proc = run_entry("predict.py", *args)
    assert "resuming: 8 of 12 images already predicted" in proc.stderr + proc.stdout
    kept = {p: p.stat().st_mtime_ns for p in (out / "maps").iterdir() if p.stem < "008"}
    assert all(done[p] == t for p, t in kept.items())  # not written again
    assert (out / "scores.csv").read_text() == whole
