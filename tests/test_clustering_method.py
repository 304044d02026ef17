"""method=clustering end to end on tiny embedded sets: outputs, the head's training, map sources, bad input."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY, compose_cfg
from texad.errors import TexadError
from texad.methods.clustering.torch_model import (
    attention_weights,
    contrastive_loss,
    mine_pairs,
    normalise_maps,
    split_pixels,
    threshold_weights,
)
from texad.pipeline import train

torch.set_num_threads(1)

# 64² gravel, 2 images per defect type: 10 anomalous test images of 5 types, 2 normal ones.
CLUSTERING = [*TINY, "method=clustering", "eval_callbacks.test_outputs.max_overlays_per_type=0",
              "method.n_clusters=oracle", "method.fca.feature_input_size=128",
              "method.blind_vae.feature_input_size=128", "method.cfa.epochs=1", "method.selection.enabled=false"]
N_ANOMALOUS, N_GOOD, N_TYPES = 10, 2, 5


def run(tmp_path, name: str, *overrides: str) -> dict:
    return train(compose_cfg("train", [*CLUSTERING, *overrides], tmp_path / name))


def read_rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def gt_run(tmp_path_factory):
    """One oracle-map run shared by the tests that only read its outputs."""
    tmp = tmp_path_factory.mktemp("clustering")
    return tmp, run(tmp, "gt", "method.maps_from=gt", "method.epochs=4")


def test_gt_maps_run_end_to_end_and_write_one_row_per_clustered_image(gt_run):
    tmp, record = gt_run
    out = tmp / "gt"
    for key in ("nmi", "ari", "cluster_f1", "raw_nmi", "raw_ari", "raw_cluster_f1"):
        assert record[key] is not None and np.isfinite(record[key]), key
    assert json.loads((out / "metrics.json").read_text())["nmi"] == pytest.approx(record["nmi"])
    assert record["n_clustered"] == N_ANOMALOUS and record["n_clusters"] == N_TYPES == record["n_types"]
    # the estimated number and the scores at both numbers are recorded too
    assert 2 <= record["k_estimated"] <= N_ANOMALOUS - 1 and 2 <= record["raw_k_estimated"] <= N_ANOMALOUS - 1
    assert set(record["k_estimates"]) == {"gap", "silhouette", "eigengap"}
    assert record["true_k_nmi"] == pytest.approx(record["nmi"])
    for key in ("est_k_nmi", "est_k_ari", "est_k_cluster_f1", "est_k_raw_nmi", "true_k_raw_cluster_f1"):
        assert np.isfinite(record[key]), key
    rows = read_rows(out / "clusters.csv")
    assert len(rows) == N_ANOMALOUS
    assert {r["defect_type"] for r in rows} == {"scratch", "crack", "stain", "hole", "foreign"}
    assert {int(r["cluster"]) for r in rows} == set(range(N_TYPES))
    for picture in ("clusters.png", "cluster_grid.png", "dendrogram.png"):
        assert (out / picture).stat().st_size > 10_000, picture
    # gt maps are the masks: the pixel metrics of the method's maps are perfect
    assert record["pixel_auroc"] == pytest.approx(1.0)


def test_head_training_loss_decreases(gt_run):
    _, record = gt_run
    assert record["head_loss_last_epoch"] < 0.9 * record["head_loss_first_epoch"]


@pytest.mark.slow
def test_stored_maps_give_the_same_clustering_as_the_maps_they_store(gt_run, tmp_path):
    src, record = gt_run
    again = run(tmp_path, "dir", f"method.maps_dir={src / 'gt' / 'maps'}", "method.epochs=4")
    assert again["maps_source"] == "dir"
    for key in ("nmi", "ari", "cluster_f1", "raw_nmi"):
        assert again[key] == pytest.approx(record[key], abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("source", ["blind_vae", "cfa"])
def test_maps_from_a_fitted_localizer_in_the_same_run(tmp_path, source):
    """blind VAE (trained on the clustered images) and CFA (on the normal ones) are fitted in the run,
    their maps are the method's maps, and the estimated k is used when n_clusters is null."""
    one_epoch = "method.blind_vae.max_steps=3" if source == "blind_vae" else "method.cfa.epochs=1"  # 10 images, 4 a step
    record = run(tmp_path, source, f"method.maps_from={source}", "method.n_clusters=null", "method.epochs=1", one_epoch)
    assert record["maps_source"] == source and record["localizer_epochs"] == 1
    assert np.isfinite(record["localizer_loss_last_epoch"]) and np.isfinite(record["pixel_auroc"])
    assert record["n_clusters"] == record["k_estimated"] and record["raw_n_clusters"] == record["raw_k_estimated"]
    assert record["nmi"] == pytest.approx(record["est_k_nmi"]) and record["n_types"] == N_TYPES
    rows = read_rows(tmp_path / source / "clusters.csv")
    assert len({r["cluster"] for r in rows}) == record["k_estimated"]


@pytest.mark.slow
def test_fca_maps_with_normal_images_included(tmp_path):
    record = run(tmp_path, "fca", "method.maps_from=fca", "method.include_good=true", "method.epochs=1")
    assert record["n_clustered"] == N_ANOMALOUS + N_GOOD and record["n_clusters"] == N_TYPES + 1
    assert len(read_rows(tmp_path / "fca" / "clusters.csv")) == N_ANOMALOUS + N_GOOD
    # FCA maps are this method's anomaly maps (at 64² the 16² feature map is too coarse to judge them)
    assert record["maps_source"] == "fca" and np.isfinite(record["pixel_auroc"])


# --- bad input -------------------------------------------------------------------------------
@pytest.mark.slow
def test_k_needs_more_anomalous_images(tmp_path):
    with pytest.raises(TexadError, match=r"method\.k=10 needs at least k\+1=11 anomalous test images.* has 10"):
        run(tmp_path, "k", "method.maps_from=gt", "method.k=10")


@pytest.mark.slow
def test_more_clusters_than_images_is_refused(tmp_path):
    with pytest.raises(TexadError, match=r"method\.n_clusters=11 is larger than the number of anomalous"):
        run(tmp_path, "n", "method.maps_from=gt", "method.n_clusters=11")


@pytest.mark.slow
def test_stored_maps_of_another_count_are_refused(gt_run, tmp_path):
    maps = tmp_path / "maps"
    shutil.copytree(gt_run[0] / "gt" / "maps", maps)
    next(maps.glob("crack/*.npz")).unlink()
    with pytest.raises(TexadError, match=rf"method\.maps_dir '{maps}' holds 11 maps but the test set has 12 images"):
        run(tmp_path, "count", f"method.maps_dir={maps}")


@pytest.mark.slow
def test_stored_maps_of_another_size_are_refused(gt_run, tmp_path):
    maps = tmp_path / "maps"
    shutil.copytree(gt_run[0] / "gt" / "maps", maps)
    victim = next(maps.glob("hole/*.npz"))
    np.savez(victim, anomaly_map=np.zeros((32, 32), np.float16))
    with pytest.raises(TexadError, match=r"map '.*hole/.*\.npz' is 32x32 but the data set's images are 64x64"):
        run(tmp_path, "size", f"method.maps_dir={maps}")


# --- the parts -------------------------------------------------------------------------------
def test_attention_is_uniform_over_a_mask_after_normalisation():
    masks = torch.zeros(2, 8, 8)
    masks[0, :2, :2] = 3.0  # any scale: normalised over the set first
    weights = attention_weights(normalise_maps(masks), 0.002)
    assert weights[0, :2, :2] == pytest.approx(torch.full((2, 2), 0.25), abs=1e-6)
    assert weights[1] == pytest.approx(torch.full((8, 8), 1 / 64))


def test_pairs_are_nearest_neighbours_and_far_half():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    positives, negatives = mine_pairs(x, k=2, negative_quantile=0.5)
    assert set(positives[0].tolist()) == {1, 2} and set(positives[4].tolist()) == {3, 5}
    assert set(negatives[0].nonzero()[:, 0].tolist()) == {3, 4, 5}
    assert not negatives.diagonal().any()


def test_pixel_split_and_loss():
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0], maps[0, 0, 1] = 1.0, 0.8
    anomalous, normal = split_pixels(maps, 0.5)
    assert anomalous.sum() == 2 and normal.sum() == 14
    same = torch.nn.functional.normalize(torch.ones(3, 4), dim=1)
    loss, parts = contrastive_loss(same, same, same, -same, -same, margin=0.5)
    assert parts["attract_anomalous"] == pytest.approx(0.0) and parts["repel_normal"] == pytest.approx(0.0)
    assert parts["attract_normal"] == pytest.approx(4.0)


def test_mutual_positives_keep_only_reciprocal_neighbours():
    # 0,1,2 form a tight group; 3 is far: its nearest (2) does not have 3 among its 2 nearest
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    positives, _ = mine_pairs(x, k=2, negative_quantile=0.5, mutual=True)
    assert set(positives[0].tolist()) == {1, 2} and set(positives[1].tolist()) == {0, 2}
    assert positives[3].tolist() == [2]  # no mutual neighbour: falls back to the nearest one
    plain, _ = mine_pairs(x, k=2, negative_quantile=0.5)
    assert set(plain[3].tolist()) == {1, 2}


def test_threshold_pooling_is_uniform_over_the_anomalous_pixels():
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, :2] = 1.0
    weights = threshold_weights(maps, 0.5)
    assert weights[0, 0, :2] == pytest.approx(torch.full((2,), 0.5)) and weights.sum() == pytest.approx(1.0)


@pytest.mark.slow
def test_cfa_maps_checkpoint_evaluates_to_the_same_clustering(tmp_path):
    """The fitted localiser (CFA's memory bank and descriptor) and the head live in the checkpoint
    (without frozen backbone weights), so evaluate.py reproduces the run."""
    from conftest import compose_cfg as compose
    from texad.pipeline import evaluate

    record = run(tmp_path, "cfa", "method.maps_from=cfa", "method.epochs=1", "method.center=normal")
    ckpt = tmp_path / "cfa" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert any(k.startswith("model.localizer.model.heads.org.bank") for k in state)
    assert not any(".backbone." in f".{k}" for k in state)
    again = evaluate(compose("evaluate", [f"ckpt_path={ckpt}", "logger=none"], tmp_path / "eval"))
    for key in ("nmi", "raw_nmi", "pixel_auroc", "est_k_nmi"):
        assert again[key] == pytest.approx(record[key], abs=1e-6), key
