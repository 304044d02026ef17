"""Every input is checked before the fit, nulls carry reasons, files follow the umask (#30, points 2–4)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import run_entry
from test_bad_input import datamodule, make_folder
from texad.data.checks import check_inputs
from texad.data.images import image_header
from texad.errors import TexadError
from texad.metrics.reasons import null_reasons
from texad.outputs import atomic_write, make_temp_dir, write_json


def test_truncated_test_image_stops_setup_before_any_fit(tmp_path):
    root = make_folder(tmp_path / "set")
    png = root / "test/good/000.png"
    png.write_bytes(png.read_bytes()[:-40])  # header intact, image data and end chunk cut
    with pytest.raises(TexadError, match=r"cannot read image .*test/good/000.png.*corrupt"):
        datamodule(root).setup()  # setup: before trainer.fit draws a single batch


def test_mask_of_other_size_stops_setup(tmp_path):
    root = make_folder(tmp_path / "set")
    cv2.imwrite(str(root / "ground_truth/crack/000_mask.png"), np.zeros((16, 16), np.uint8))
    with pytest.raises(TexadError, match=r"000_mask.png.* is 16x16 but its image .*crack/000.png.* is 32x32"):
        datamodule(root).setup()


def test_header_gives_the_decoded_size_for_every_format(tmp_path):
    rng = np.random.default_rng(0)
    for suffix in (".png", ".jpg", ".bmp", ".tif"):
        path = tmp_path / f"a{suffix}"
        cv2.imwrite(str(path), rng.integers(0, 255, (17, 29, 3), np.uint8))
        assert image_header(path) == cv2.imread(str(path)).shape[:2] == (17, 29)
    with pytest.raises(TexadError, match="does not exist"):
        image_header(tmp_path / "none.png")


def test_empty_and_grey_masks_are_named_and_counted(tmp_path, caplog):
    root = make_folder(tmp_path / "set")
    cv2.imwrite(str(root / "test/crack/001.png"), np.full((32, 32), 128, np.uint8))
    cv2.imwrite(str(root / "ground_truth/crack/001_mask.png"), np.zeros((32, 32), np.uint8))  # empty
    grey = np.zeros((32, 32), np.uint8)
    grey[5:10, 5:10], grey[20:25, 20:25] = 255, 128  # two levels besides 0
    cv2.imwrite(str(root / "ground_truth/crack/000_mask.png"), grey)
    dm = datamodule(root)
    with caplog.at_level(logging.WARNING, logger="texad.data.checks"):
        dm.setup()
    report = dm.input_report
    assert report["empty_defect_masks"] == 1 and report["empty_defect_mask_images"] == [str(root / "test/crack/001.png")]
    assert report["non_binary_masks"] == 1 and report["test_defect_pixels"] == 50
    assert report["n_test_defective"] == 2 and report["n_test_normal"] == 1
    lines = [r.getMessage() for r in caplog.records]
    assert any("1 defective test image(s) have an empty mask" in m and "crack/001.png" in m for m in lines)
    assert any("binarised by the rule 'pixel > 0 is defective'" in m for m in lines)
    # the stated rule is the one the loader applies
    item = dm.test_dataset()[0]
    assert int(item["mask"].sum()) == 50


def test_every_null_gets_a_reason():
    test = {"pixel_auroc": None, "pixel_aupr": None, "image_auroc": 0.7, "pixel_aupimo": None, "ring_ratio": 1.0}
    black = {"n_test_normal": 3, "n_test_defective": 2, "test_has_masks": True, "test_defect_pixels": 0}
    reasons = null_reasons(test, black, 64 * 64)
    assert reasons == {k: "no defective pixel in the test masks" for k in ("pixel_auroc", "pixel_aupr", "pixel_aupimo")}
    only_normal = {"n_test_normal": 3, "n_test_defective": 0, "test_has_masks": True, "test_defect_pixels": 0}
    assert null_reasons({"image_auroc": None}, only_normal) == {"image_auroc": "no defective image in the test set"}
    no_masks = {"n_test_normal": 3, "n_test_defective": 2, "test_has_masks": False}
    assert "no pixel masks" in null_reasons({"pixel_aupro": None}, no_masks)["pixel_aupro"]
    few = {"n_test_normal": 2, "n_test_defective": 2, "test_has_masks": True, "test_defect_pixels": 10}
    assert "too few normal pixels" in null_reasons({"pixel_aupimo": None}, few, 64 * 64)["pixel_aupimo"]
    assert null_reasons({"image_f1_at_val": None}, few, has_validation=False)["image_f1_at_val"].startswith("no validation")
    assert null_reasons({"pixel_auroc": 0.5}, few) == {}


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_results_and_caches_follow_the_umask(tmp_path, umask_022):
    assert mode(write_json(tmp_path / "metrics.json", {"a": 1})) == 0o644
    assert mode(atomic_write(tmp_path / "x.bin", lambda tmp: tmp.write_bytes(b"1"))) == 0o644
    assert mode(make_temp_dir(".partial-", tmp_path)) == 0o755
    from texad.data.superpixels import SuperpixelCache

    cache = SuperpixelCache(tmp_path / "slic")
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)
    cache.labels_for(str(tmp_path / "img.png"), image, 8)
    assert [mode(p) for p in (tmp_path / "slic").iterdir()] == [0o644]
    os.umask(0o077)  # a private umask is followed too
    assert mode(write_json(tmp_path / "private.json", {"a": 1})) == 0o600


def test_generated_set_folder_follows_the_umask(tmp_path, umask_022):
    from texad.data.datamodule import generated

    def build() -> Path:  # what texad.data.embedded does: build in mkdtemp (0700), rename into place
        import tempfile

        tmp = Path(tempfile.mkdtemp(dir=tmp_path))
        (tmp / "a.txt").write_text("x")
        target = tmp_path / "set"
        os.replace(tmp, target)
        return target

    assert mode(generated(tmp_path, build)) == 0o755


def test_read_only_cache_is_one_line(tmp_path):
    import errno

    from texad.data.datamodule import generated

    def build() -> Path:  # what mkdir in a read-only cache raises (root is not refused by chmod, so raised here)
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro" / "textures"))

    with pytest.raises(TexadError, match=r"cache dir .*ro.* cannot build the data set there: Permission denied"):
        generated(tmp_path / "ro", build)


def test_full_or_read_only_folder_names_the_file(tmp_path, monkeypatch):
    """ENOSPC/EROFS while writing a result or cache file is one TexadError naming it (no half file left)."""
    import errno

    def full(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(TexadError, match=r"cannot write .*metrics.json.*No space left on device"):
        atomic_write(tmp_path / "metrics.json", full)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_all_black_masks_give_null_pixel_metrics_with_reasons(tmp_path):
    root = make_folder(tmp_path / "set", n_train=4, size=64)
    cv2.imwrite(str(root / "ground_truth/crack/000_mask.png"), np.zeros((64, 64), np.uint8))
    proc = run_entry("train.py", "method=fca", "dataset=folder", f"dataset.root={root}", "dataset.image_size=64",
                     "dataset.val_fraction=0.0", "logger=none", "trainer.enable_progress_bar=false",
                     f"hydra.run.dir={tmp_path / 'run'}")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["pixel_auroc"] is None and record["reasons"]["pixel_auroc"] == "no defective pixel in the test masks"
    assert all(record[k] is None or k not in record["reasons"] for k in record["reasons"])
    assert record["inputs"]["empty_defect_masks"] == 1
    warnings = [line for line in (proc.stderr + proc.stdout).splitlines() if "test metrics null:" in line]
    assert len(warnings) == 1 and "pixel_auroc (no defective pixel in the test masks)" in warnings[0]
