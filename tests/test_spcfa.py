"""Sp-CFA: superpixel views reach the model, off views cost nothing, and sweeps reuse trained views."""

from __future__ import annotations

import json
import pickle

import lightning as L
import numpy as np
import pytest
import torch

from conftest import TINY, compose_cfg, run_entry
from texad.data.superpixel_views import SuperpixelViews
from texad.data.superpixels import SuperpixelCache, arrange_tiles, guard_corner, slic_labels
from texad.errors import TexadError
from texad.pipeline import build

# region sizes in pixels of the 64² input (no reference size to scale from)
SPCFA_TINY = [*TINY, "method=spcfa", "method.epochs=1", "dataset.num_workers=0", "method.slic.region_size_reference=null"]


def test_superpixel_views_builder_is_picklable_and_keyed_by_pixels(tmp_path):
    views = SuperpixelViews([8, 16], tmp_path / "sp")
    views = pickle.loads(pickle.dumps(views))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    item = views(image, str(tmp_path / "a.png"), (0.5,) * 3, (0.5,) * 3)
    assert item["superpixels"].shape == (2, 64, 64) and item["superpixels"].dtype == torch.int64
    assert item["mosaics"].shape == (2, 3, 64, 64) and item["mosaics"].dtype == torch.float32
    # a synthetic-defect copy of the same file is a different image: a different cache entry
    cache = SuperpixelCache(tmp_path / "sp")
    changed = image.copy()
    changed[20:30, 20:30] = 255
    assert cache.key(str(tmp_path / "a.png"), image, 8) != cache.key(str(tmp_path / "a.png"), changed, 8)


@pytest.mark.slow
def test_mosaic_views_reach_the_model_and_null_views_are_not_computed(tmp_path):
    cfg = compose_cfg("train", [*SPCFA_TINY, "method.region_sizes=[8,null]", "method.alpha=[0.5,0.5,0.0]"],
                      tmp_path / "run")
    L.seed_everything(cfg.seed)
    datamodule, method = build(cfg)
    assert method.model.view_names == ["org", "small"] and "big" not in method.model.heads
    assert datamodule.views.region_sizes == [8]

    # validation items (with planted synthetic defects) get labels of the image the model sees
    datamodule.setup("fit")
    val = datamodule.val_dataset()
    synthetic = max(val.synthetic)
    image = val.load(synthetic)[0]
    item = val[synthetic]
    expected = arrange_tiles(slic_labels(image, 8, **datamodule.views.slic), datamodule.views.mosaic_guard)
    assert datamodule.views.mosaic_guard == 32 and datamodule.views.mosaic_order == "place"  # the defaults
    assert torch.equal(item["superpixels"][0], torch.from_numpy(expected).long())

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(method, datamodule=datamodule)
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.superpixels.shape == (len(batch), 1, 64, 64)
    assert batch.extra["mosaics"].shape == (len(batch), 1, 3, 64, 64)
    method.eval()
    with torch.no_grad():
        out = method.predict_maps(batch)
    assert out["anomaly_map"].shape == (len(batch), 64, 64)
    assert set(out["view_maps"]) == {"org", "small"}
    assert not torch.allclose(out["view_maps"]["org"], out["view_maps"]["small"])


def test_cfa_view_is_the_same_with_or_without_superpixel_views(tmp_path):
    """The original view's initial weights (hence training) do not depend on the other views."""
    heads = {}
    for name, extra in (("cfa", ["method=cfa"]), ("spcfa", ["method.region_sizes=[8,16]"])):
        base = [o for o in SPCFA_TINY if name == "spcfa" or not o.startswith("method.slic")]  # CFA has no slic
        cfg = compose_cfg("train", [*base, *extra], tmp_path / name)
        L.seed_everything(cfg.seed)
        heads[name] = build(cfg)[1].model.heads
        after = torch.rand(1)  # the global RNG after building must be the same too
        heads[name + "_rng"] = after
    for key, value in heads["cfa"]["org"].state_dict().items():
        assert torch.equal(value, heads["spcfa"]["org"].state_dict()[key]), key
    assert torch.equal(heads["cfa_rng"], heads["spcfa_rng"])


def _view_cache(run_dir):
    return json.loads((run_dir / "view_cache.json").read_text())


@pytest.mark.slow
def test_alpha_sweep_trains_each_view_once_and_evaluate_refuses_alpha(tmp_path):
    sweep = tmp_path / "sweep"
    run_entry(
        "train.py", "-m", *SPCFA_TINY, "method.region_sizes=[8,16]",
        "method.alpha=[0.5,0.25,0.25],[0.2,0.2,0.6]",
        f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}",
    )
    first, second = _view_cache(sweep / "0"), _view_cache(sweep / "1")
    assert first["heads"] == {"org": "trained", "small": "trained", "big": "trained"}
    assert second["heads"] == {"org": "hit", "small": "hit", "big": "hit"}  # no retraining
    assert second["maps"]["test"] == {"org": "hit", "small": "hit", "big": "hit"}
    assert not (sweep / "1" / "checkpoints" / "epoch_000.ckpt").exists()
    m0 = json.loads((sweep / "0" / "metrics.json").read_text())
    m1 = json.loads((sweep / "1" / "metrics.json").read_text())
    assert m0["pixel_aupr"] != m1["pixel_aupr"]  # same views, other α, other fused map
    # each view alone, on validation and test, with intervals; the same maps (cached or not) in both runs
    for record in (m0, m1):
        for views in (record["views"], record["val"]["views"]):
            assert set(views) == {"org", "small", "big"}
            for v in views.values():
                assert 0.0 <= v["pixel_auroc"] <= 1.0 and v["pixel_aupr"] is not None and v["pixel_aupro"] is not None
                low, high = v["ci95"]["pixel_aupr"]
                assert low <= v["pixel_aupr"] <= high or abs(high - low) < 1e-6 or low <= high
        assert record["blur_order"] == "after"
    assert m0["views"] == m1["views"]
    drawn = sorted((sweep / "0" / "overlays_views").rglob("*.png"))
    assert 0 < len(drawn) <= 8

    # α re-fusion on validation maps, then test metrics at that α
    out = tmp_path / "eval"
    run_entry("evaluate.py", f"ckpt_path={sweep / '1' / 'checkpoints' / 'last.ckpt'}", "fusion.search=grid",
              "fusion.step=0.25", "logger=none", f"hydra.run.dir={out}")
    record = json.loads((out / "metrics.json").read_text())
    fusion = record["fusion"]
    assert fusion["n_points"] == 15 and abs(sum(fusion["alpha"]) - 1.0) < 1e-9
    assert fusion["val_metric"] == record["val"]["pixel_aupr"]
    assert record["pixel_aupr"] is not None and "test_at_trained_alpha" in fusion
    assert set(fusion["by_order"]) == {"after", "mosaic"} and fusion["blur_order"] in fusion["by_order"]
    assert fusion["val_metric"] == max(o["val_metric"] for o in fusion["by_order"].values())
    assert record["views"]["small"]["pixel_auroc"] is not None


@pytest.mark.slow
def test_region_size_sweep_reuses_the_shared_views(tmp_path):
    sweep = tmp_path / "sweep"
    run_entry(
        "train.py", "-m", *SPCFA_TINY, "method.region_sizes=[8,null],[8,16]",
        "method.alpha=[0.5,0.5,0.0]", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}",
    )
    assert _view_cache(sweep / "0")["heads"] == {"org": "trained", "small": "trained"}
    assert _view_cache(sweep / "1")["heads"] == {"org": "hit", "small": "hit", "big": "trained"}
    assert (sweep / "1" / "metrics.json").is_file()


# Table II of Rafiei et al. 2024 as printed: (α1, α2, α3, rs_s, rs_b); rs_b None = "-".
TABLE_II = {
    "mvtec_carpet": (0.25, 0.0, 0.75, 10, None),
    "mvtec_grid": (0.1, 0.1, 0.8, 10, 35),
    "mvtec_leather": (0.1, 0.0, 0.9, 15, None),
    "mvtec_tile": (0.15, 0.2, 0.65, 10, 30),
    "mvtec_wood": (0.15, 0.1, 0.75, 10, 40),
    "ksdd2": (0.1, 0.35, 0.55, 10, 30),
    "xray": (0.25, 0.35, 0.4, 20, 40),
}


def test_table_ii_experiments_give_alpha3_to_the_small_view(tmp_path):
    """α3 weights the small view (rs_s) and α2 the big one: the only reading under which Table II's
    single-view rows (rs_b "-", α2 = 0) weight a view that exists. texad's order is [α_org, α_small, α_big]."""
    for name, (a1, a2, a3, rs_s, rs_b) in TABLE_II.items():
        cfg = compose_cfg("train", [f"experiment=spcfa/{name}", "paths.data_root=/nonexistent"], tmp_path / name)
        assert list(cfg.method.region_sizes) == [rs_s, rs_b], name
        assert [float(a) for a in cfg.method.alpha] == [a1, a3, a2], name
        assert cfg.method.name == "spcfa" and list(cfg.method.loss_weights) == [1.0, 1.0, 1.0]
    # the default (chosen on validation) is a point of the simplex with both views on
    cfg = compose_cfg("train", ["method=spcfa"], tmp_path / "default")
    alpha = [float(a) for a in cfg.method.alpha]
    assert cfg.method.region_sizes[0] < cfg.method.region_sizes[1] and abs(sum(alpha) - 1.0) < 1e-9


def test_mosaic_fill_reaches_the_views_and_the_view_key(tmp_path):
    """method.slic.mosaic_fill builds the mosaic; the trained-view key changes with it; zeros is the paper's."""
    keys, mosaics = {}, {}
    for fill in ("reflect", "zeros"):
        cfg = compose_cfg("train", [*SPCFA_TINY, "method.region_sizes=[8,null]", "method.alpha=[0.5,0.5,0.0]",
                                    f"method.slic.mosaic_fill={fill}"], tmp_path / fill)
        datamodule, method = build(cfg)
        assert datamodule.views.mosaic_fill == fill and "mosaic_fill" not in datamodule.views.slic
        keys[fill] = method.view_keys["small"]
        assert method.view_keys["org"]  # the original view does not depend on the fill ...
        keys[fill + "_org"] = method.view_keys["org"]
        datamodule.setup("fit")
        mosaics[fill] = datamodule.train_dataset()[0]["mosaics"][0]
    assert keys["reflect"] != keys["zeros"] and keys["reflect_org"] == keys["zeros_org"]
    # the paper's mosaic has a black free area (normalised: -mean/std); reflect leaves none of it
    black = mosaics["zeros"] == mosaics["zeros"].min()
    assert black.float().mean() > 0.01 and not torch.equal(mosaics["reflect"][black], mosaics["zeros"][black])
    bad = compose_cfg("train", [*SPCFA_TINY, "method.slic.mosaic_fill=mirror"], tmp_path / "bad")
    with pytest.raises(TexadError, match="mosaic_fill"):
        build(bad)


def test_superpixel_views_guard_the_mosaic_corner_in_the_labels_they_return(tmp_path):
    """With method.slic.mosaic_guard the batch labels are slot ids (guard_corner), so the model's
    inverse (which only sees labels) reads each superpixel from where the mosaic put it."""
    from texad.data.superpixels import inverse_mosaic

    import cv2

    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur((rng.random((64, 64, 3)) * 255).astype(np.uint8), (0, 0), 3)
    def views(**slic):
        return SuperpixelViews([8], None, slic)(image, "a.png", (0.0,) * 3, (1 / 255,) * 3)

    plain = views(mosaic_guard=0, mosaic_order="label")
    guarded = views(mosaic_guard=16, mosaic_order="label")
    placed = views(mosaic_guard=16)
    labels = slic_labels(image, 8)
    assert torch.equal(plain["superpixels"][0], torch.from_numpy(labels).long())
    assert torch.equal(guarded["superpixels"][0], torch.from_numpy(guard_corner(labels, 16)).long())
    assert torch.equal(placed["superpixels"][0], torch.from_numpy(arrange_tiles(labels, 16)).long())
    # all mosaics carried back give the image (up to resampling), superpixel by superpixel
    for item in (plain, guarded, placed):
        back = inverse_mosaic(item["mosaics"][:, 0], item["superpixels"])[0]  # mean 0, std 1/255: pixel units
        assert (back - torch.from_numpy(image[..., 0]).float()).abs().mean() < 2.0
    with pytest.raises(TexadError, match="mosaic_guard"):
        SuperpixelViews([8], None, {"mosaic_guard": -1})
    with pytest.raises(TexadError, match="mosaic_order"):
        SuperpixelViews([8], None, {"mosaic_order": "raster"})
    with pytest.raises(TexadError, match="region_size_reference"):
        SuperpixelViews([8], None, {"region_size_reference": 0})
    with pytest.raises(TexadError, match="unknown keys"):
        SuperpixelViews([8], None, {"rular": 10})


def test_region_sizes_scale_with_the_input_so_one_config_builds_the_same_view():
    """region_size_reference: rs pixels at reference² become rs·side/reference at any input side."""
    import cv2

    from texad.data.superpixel_views import scaled_region_size

    assert scaled_region_size(10, 128, 128, 256) == 5 and scaled_region_size(10, 512, 512, 256) == 20
    assert scaled_region_size(10, 224, 224, 224) == 10 and scaled_region_size(35, 256, 256, 224) == 40
    assert scaled_region_size(10, 128, 128, None) == 10
    rng = np.random.default_rng(0)
    big = cv2.GaussianBlur((rng.random((256, 256, 3)) * 255).astype(np.uint8), (0, 0), 4)
    small = cv2.resize(big, (128, 128), interpolation=cv2.INTER_AREA)
    views = SuperpixelViews([20], None, {"region_size_reference": 256})
    counts = [int(views(im, "a.png", (0.0,) * 3, (1.0,) * 3)["superpixels"][0].unique().numel()) for im in (big, small)]
    # the same number of superpixels (up to SLIC's connectivity merges) at both sizes
    assert abs(counts[0] - counts[1]) <= 0.15 * counts[0]
    fixed = SuperpixelViews([20], None, {"region_size_reference": None})
    unscaled = int(fixed(small, "a.png", (0.0,) * 3, (1.0,) * 3)["superpixels"][0].unique().numel())
    assert unscaled < 0.5 * counts[0]  # pixels of the input: a coarser view at 128²
