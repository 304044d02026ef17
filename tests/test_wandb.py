"""logger=wandb works with no account and no network: offline runs, one per multirun job, one group."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from conftest import TINY, run_entry

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK, HEADER = 32768, 7  # the .wandb file is a LevelDB-style log of protobuf records


def wandb_records(path: Path):
    """Records of an offline run file (no W&B reader API needed: the log format is simple)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:  # full
            pending = b""
            yield _parse(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield _parse(pending + chunk)
            pending = b""


def _parse(raw: bytes):
    record = wandb_pb.Record()
    record.ParseFromString(raw)
    return record


def read_offline_run(run_dir: Path) -> dict:
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    out = {"history": {}, "config": set(), "run": None, "dir": files[0].parent}
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            for it in rec.history.item:
                out["history"].setdefault(it.key or "/".join(it.nested_key), []).append(it.value_json)
        elif kind == "config":
            out["config"].update(it.key or "/".join(it.nested_key) for it in rec.config.update)
        elif kind == "run":
            out["run"] = rec.run
    return out


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wandb")
    out = tmp / "multirun"
    env_backup = dict(os.environ)
    os.environ.update({
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp / "cfg"),
        "WANDB_CACHE_DIR": str(tmp / "cache"), "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing listens there
    })
    for key in ("WANDB_API_KEY", "WANDB_RUN_GROUP", "WANDB_ENTITY"):
        os.environ.pop(key, None)
    try:
        overrides = [o for o in TINY if not o.startswith(("method.epochs", "logger="))]
        run_entry("train.py", "-m", *overrides, "logger=wandb", f"hydra.sweep.dir={out}",
                  "eval_callbacks.test_outputs.max_overlays_per_type=1", "method.epochs=1,2")
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    return out


@pytest.mark.slow
def test_offline_run_holds_metrics_config_and_images(sweep_dir):
    run = read_offline_run(sweep_dir / "0")
    metrics = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    for key in ("pixel_aupr", "pixel_aupro", "image_auroc"):
        assert float(run["history"][f"test/{key}"][-1]) == pytest.approx(metrics[key], rel=1e-5)
    assert float(run["history"]["val/pixel_aupr"][-1]) == pytest.approx(metrics["val"]["pixel_aupr"], rel=1e-5)
    assert "train/loss" in run["history"]
    assert "config" in run["config"]  # the resolved run config
    for key in ("test/overlays", "test/pr_curve", "test/pro_curve"):
        assert f"{key}/filenames" in run["history"], key
    assert len(list(run["dir"].glob("files/media/images/test/*.png"))) >= 3
    assert run["run"].project == "texad" and "texad" in run["run"].tags


@pytest.mark.slow
def test_multirun_jobs_are_separate_runs_in_one_group(sweep_dir):
    a, b = read_offline_run(sweep_dir / "0"), read_offline_run(sweep_dir / "1")
    assert a["run"].run_id != b["run"].run_id  # wandb.finish() between jobs
    assert a["run"].run_group == b["run"].run_group == str(sweep_dir)
    # each job has its own history: job 0 trained 1 epoch, job 1 trained 2
    assert max(map(float, a["history"]["epoch"])) == 0 and max(map(float, b["history"]["epoch"])) == 1
