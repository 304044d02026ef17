"""Test splits drawn from a seed use dataset.split_seed, not the run seed: runs of any seed share one test set."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from hydra.utils import instantiate

from conftest import compose_cfg


def make_mtd(root: Path) -> Path:
    rng = np.random.default_rng(0)
    spot = np.zeros((16, 16), np.uint8)
    spot[4:8, 4:8] = 255
    for kind, n in (("MT_Free", 10), ("MT_Crack", 2)):
        (root / kind / "Imgs").mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / kind / "Imgs" / f"{i}.jpg"), rng.integers(0, 255, (16, 16), np.uint8))
            cv2.imwrite(str(root / kind / "Imgs" / f"{i}.png"), spot if kind != "MT_Free" else 0 * spot)
    return root


def split_of(tmp_path: Path, *overrides: str):
    dm = instantiate(compose_cfg("train", list(overrides), tmp_path / "run").dataset, _convert_="all")
    dm.setup()
    return [str(s.path) for s in dm.split.train], [str(s.path) for s in dm.split.test]


def test_mtd_runs_of_any_seed_see_one_test_set(tmp_path):
    root = make_mtd(tmp_path / "mtd")
    base = ["dataset=mtd", f"paths.data_root={root}"]
    train0, test0 = split_of(tmp_path, *base, "seed=0")
    train1, test1 = split_of(tmp_path, *base, "seed=1")
    assert test0 == test1 and train0 == train1
    _, test_other = split_of(tmp_path, *base, "seed=0", "dataset.split_seed=1")
    assert test_other != test0  # the split has its own seed, and it is used


def test_elpv_runs_of_any_seed_see_one_test_set(tmp_path):
    base = ["dataset=elpv", "dataset.limit=12", f"dataset.cache_dir={tmp_path / 'elpv'}"]
    train0, test0 = split_of(tmp_path, *base, "seed=0")
    train1, test1 = split_of(tmp_path, *base, "seed=1")
    assert test0 == test1 and train0 == train1
    names = lambda paths: sorted(Path(p).name for p in paths)  # noqa: E731
    _, test_other = split_of(tmp_path, *base, "seed=0", "dataset.split_seed=5")
    assert names(test_other) != names(test0)
