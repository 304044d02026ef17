"""Runs started at once on one fresh cache directory end as runs in sequence (#30, point 5).

Two runs at once (the machine this was written on has 2 cores; four tiny runs at once take it over
for minutes): both generate the embedded set, probe the backbone's geometry and fill the frozen-feature
cache in the same, initially empty, cache directory. Their metrics must equal those of runs made one
after the other in another fresh cache directory, no temp file may be left, and every file of the
cache must be readable by the group under umask 022.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY

NOT_COMPARED = {"wall_time_s", "fit_time_s", "image_rule_time_s", "feature_cache", "validation_feature_cache"}
CONFIG = [o for o in TINY if not o.startswith("method.epochs")] + [
    "method.epochs=1", "eval_callbacks.test_outputs.max_overlays_per_type=0"]


def start(cache: Path, run: Path) -> subprocess.Popen:
    env = {**os.environ, "TEXAD_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *CONFIG, f"hydra.run.dir={run}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]


def metrics(run: Path) -> dict:
    record = json.loads((run / "metrics.json").read_text())
    record.get("inputs", {}).pop("check_time_s", None)
    return {k: v for k, v in record.items() if k not in NOT_COMPARED}


@pytest.mark.slow
def test_two_runs_at_once_on_one_fresh_cache_equal_runs_in_sequence(tmp_path):
    before = os.umask(0o022)
    try:
        shared, alone = tmp_path / "shared-cache", tmp_path / "own-cache"
        procs = [start(shared, tmp_path / f"together{i}") for i in range(2)]
        for proc in procs:
            finish(proc)
        for i in range(2):
            finish(start(alone, tmp_path / f"sequence{i}"))
    finally:
        os.umask(before)
    reference = metrics(tmp_path / "sequence0")
    assert metrics(tmp_path / "sequence1") == reference
    for i in range(2):
        assert metrics(tmp_path / f"together{i}") == reference
    files = [p for p in shared.rglob("*")]
    assert any(p.suffix == ".pt" for p in files), "the frozen-feature cache was not written"
    assert not [p for p in files if ".partial-" in p.name or p.name.endswith(".tmp")]
    for path in files:  # the group can read what either run wrote (locks included)
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path
