"""docs/adding-a-method.md, proven: a method that lives outside src/ (tests/tiny_method/mean_distance.py)
is registered by one YAML in a config dir of its own and runs end to end through train.py; the two
tests the guide asks of a new method are here for it (a brute-force check, a bar it must pass)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY
from texad.backbones import FeatureExtractor
from texad.cli import check_group_overrides
from texad.data.batch import Batch

TINY_METHOD = ROOT / "tests" / "tiny_method"
sys.path.insert(0, str(TINY_METHOD))
from mean_distance import MeanFeatureDistance  # noqa: E402  (tests/tiny_method, as the YAML's _target_ finds it)


def batch(images: torch.Tensor) -> Batch:
    n = len(images)
    return Batch(image=images, path=[f"{i}.png" for i in range(n)], label=torch.zeros(n, dtype=torch.long),
                 defect_type=["good"] * n)


def test_brute_force_mean_and_distance(one_thread):
    """The fitted mean and the map's cells against a loop over images and locations."""
    torch.manual_seed(0)
    backbone = FeatureExtractor("efficientnet_lite0", (1, 2), weights="package", mean=(0.5,) * 3, std=(0.5,) * 3)
    method = MeanFeatureDistance(backbone, layers=[1])
    train = torch.rand(3, 3, 32, 32)
    method.build_statistics([batch(train[:2]), batch(train[2:])])
    with torch.no_grad():
        feats = method.model.features(train)
        test = torch.rand(2, 3, 32, 32)
        test_feats = method.model.features(test)
        cells = method.model.distance(test)
    c, h, w = feats.shape[1:]
    for y in range(h):
        for x in range(w):
            mean = [sum(float(feats[i, k, y, x]) for i in range(3)) / 3 for k in range(c)]
            assert torch.allclose(method.model.mean[:, y, x], torch.tensor(mean), atol=1e-5)
            for i in range(2):
                d = sum((float(test_feats[i, k, y, x]) - mean[k]) ** 2 for k in range(c)) ** 0.5
                assert float(cells[i, y, x]) == pytest.approx(d, abs=1e-4)
    out = method.predict_maps(batch(test))
    assert out["anomaly_map"].shape == (2, 32, 32)
    assert torch.equal(out["pred_score"], out["anomaly_map"].flatten(1).amax(1))


def test_a_method_of_ones_own_config_dir_is_a_known_choice(capsys):
    conf = ROOT / "conf"
    check_group_overrides(["--config-dir", str(TINY_METHOD / "conf"), "method=mean_distance"], conf)
    check_group_overrides([f"--config-dir={TINY_METHOD / 'conf'}", "method=mean_distance"], conf)
    with pytest.raises(SystemExit):
        check_group_overrides(["method=mean_distance"], conf)  # without its config dir it is unknown
    assert "mean_distance" not in capsys.readouterr().err.split("choices:")[1]


@pytest.mark.slow
def test_registered_by_config_alone_it_runs_through_train_py(tmp_path):
    """train.py --config-dir tests/tiny_method/conf method=mean_distance: fit, validation, test, metrics.json."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TINY_METHOD), os.environ.get("PYTHONPATH", "")])}
    overrides = [o for o in TINY if not o.startswith("method.")]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config-dir", str(TINY_METHOD / "conf"), "method=mean_distance",
         *overrides, "eval_callbacks.test_outputs.max_overlays_per_type=0", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["method"] == "mean_distance" and record["statistics"]["images"] == 6
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "scores.csv").is_file()
    # the bar: a map that ranks pixels at random has pixel AUROC 0.5 in expectation; this deterministic
    # run (64² gravel, seed 0) measured 0.643
    assert record["pixel_auroc"] > 0.6
