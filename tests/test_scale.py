"""Scaling paths a user relies on: DDP builds the same bank as one process; joblib sweeps run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, run_entry

SMALL = [o for o in TINY if not o.startswith(("method.epochs", "dataset.n_val_good"))] + [
    "dataset.n_train=8",
    "dataset.val_fraction=0", "dataset.n_val_good=0",
    "eval_callbacks.test_outputs.max_overlays_per_type=0",
]


@pytest.mark.slow
def test_ddp_two_cpu_processes_build_the_same_bank_as_one(tmp_path):
    # epochs=0: the model is exactly its memory bank, so the bank reduction across ranks is what is
    # compared, bank and metrics alike (training itself then differs only by float summation order)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_entry("train.py", *SMALL, "method.epochs=0", "dataset.batch_size=4", f"hydra.run.dir={single}")
    run_entry("train.py", *SMALL, "method.epochs=0", "trainer=ddp", "trainer.devices=2", "dataset.batch_size=2",
              f"hydra.run.dir={ddp}")
    a = torch.load(single / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(ddp / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    key = "model.heads.org.bank.centroids"
    assert a[key].shape == b[key].shape
    assert torch.allclose(a[key], b[key], atol=1e-5)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (single, ddp))
    for k in ("pixel_auroc", "pixel_aupro", "pixel_aupr", "image_auroc"):
        assert mb[k] == pytest.approx(ma[k], abs=1e-5), k


@pytest.mark.slow
def test_joblib_launcher_runs_a_two_job_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    run_entry(
        "train.py", "-m", *SMALL, "method.epochs=1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "method.blur_sigma=2.0,4.0", f"hydra.sweep.dir={sweep}",
    )
    records = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(2)]
    assert all(r["pixel_auroc"] is not None for r in records)
    assert records[0]["pixel_auroc"] != records[1]["pixel_auroc"]  # the swept value really changed
    assert (sweep / "summary.csv").is_file()


@pytest.mark.slow
def test_frozen_feature_cache_changes_nothing_and_is_reused_across_runs(tmp_path):
    """CFA with the shared feature cache (texad.feature_store): the same metrics to the last digit as with
    it off; within a fit each image's backbone runs once, and a second run runs none."""
    from conftest import compose_cfg
    from texad.pipeline import train

    def run(name, *extra):
        overrides = [*TINY, "method.epochs=2", f"paths.cache_dir={tmp_path}/cache",
                     "eval_callbacks.test_outputs.max_overlays_per_type=0", *extra]
        return train(compose_cfg("train", overrides, tmp_path / name))

    plain = run("plain", "feature_cache.enabled=false")
    cached = run("cached")
    again = run("again")
    for key in ("pixel_auroc", "pixel_aupro", "pixel_aupr", "image_auroc", "val", "val_curve"):
        assert cached[key] == plain[key], key
        assert again[key] == plain[key], key
    assert "feature_cache" not in plain
    # the fit reads training images (bank, 2 epochs, calibrations) and validation images (2 epochs):
    # each computed once, then hits
    computed = cached["feature_cache"]["misses"]
    assert computed > 0 and cached["feature_cache"]["hits_memory"] > computed
    hits = again["feature_cache"]["hits_memory"] + again["feature_cache"]["hits_disk"]  # same process: memory
    assert again["feature_cache"]["misses"] == 0 and hits == sum(cached["feature_cache"].values())


@pytest.mark.slow
def test_bench_prints_the_figures_of_every_method(tmp_path):
    """`python -m texad.tools.bench` on tiny sizes: one JSON object with every figure the issue asks for."""
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "texad.tools.bench", "--methods", "cfa,fca", "--size", "64", "--n-train", "2",
        "--batch", "2", "--epochs", "2", "--repeats", "1", "--metric-images", "6",
        "--refusion-points", "2", "--refusion-images", "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    cfa = report["methods"]["cfa"]
    assert "error" not in cfa, cfa
    for key in ("train_images_per_s", "inference_images_per_s", "backbone_images_per_s", "inference_over_backbone", "peak_rss_mb"):
        assert cfa[key] > 0, key
    assert cfa["exact_search"]["queries"] == 2 * 16 * 16  # 64² input, stride-4 features
    assert cfa["exact_search"]["matmul_over_backbone"] > 0
    assert cfa["exact_search"]["inference_over_padded_floor"] > 0  # CFA's default pads its input
    fca = report["methods"]["fca"]
    assert "error" not in fca and fca["inference_over_backbone"] > 0
    for method in (cfa, fca):  # backbone and inference with and without the (fresh, then warm) feature cache
        assert set(method["backbone_s"]) == {"no_cache", "cache"} and min(method["backbone_s"].values()) > 0
        assert set(method["inference_s"]) == {"no_cache", "cache"}
        assert method["feature_cache"]["misses"] > 0 and method["feature_cache"]["hits_memory"] > 0
    assert report["pixel_metrics"]["n_images"] == 6 and report["pixel_metrics"]["aupro_s"] > 0
    assert report["alpha_refusion"]["n_points"] == 2
