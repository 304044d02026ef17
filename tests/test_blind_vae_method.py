"""Blind VAE method: trains on the unlabelled test set through train.py, both scores, clear errors."""

import pytest
import torch
from PIL import Image

from texad.backbones import FeatureExtractor
from texad.data.batch import Batch
from texad.errors import TexadError
from texad.methods.blind_vae import BlindVAEMethod


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_train_py_fits_the_vae_on_the_blind_set_and_scores_both_ways(tiny_cfg, tmp_path):
    from texad.pipeline import build, train

    overrides = ["method=blind_vae", "setting=blind", "method.feature_input_size=256", "method.zero_border=2",
                 "method.vectors_per_step=256", "dataset.n_per_type=1"]
    cfg = tiny_cfg(*overrides)
    record = train(cfg)
    assert record["method"] == "blind_vae" and record["pixel_aupro"] is not None
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("model.vae.") for k in state)
    assert not any(k.startswith("model.backbone.") for k in state)

    dm, method = build(tiny_cfg(*overrides, "method.score=residual_norm"))
    method.load_method_state(state)
    dm.setup("fit")
    assert len(dm.train_samples) == len(dm.split.test)  # blind: trained on the test images
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        out = method.predict_maps(batch)
    assert out["anomaly_map"].shape == batch.image.shape[:1] + batch.image.shape[-2:]
    # zeroed 2-cell frame of the 32² map: every pixel at or outside the centre of the second cell from
    # either edge (where the bilinear resampling reads zeroed cells only) is zero, the inside is not
    grid = method.model.grid(tuple(batch.image.shape[-2:]), (32, 32))
    first, last = grid.offset[0] + grid.stride[0], grid.offset[0] + grid.stride[0] * 30
    rows = torch.arange(batch.image.shape[-2], dtype=torch.float64)
    frame = (rows <= first) | (rows >= last)
    amap = out["anomaly_map"]
    assert frame.any() and (amap[:, frame] == 0).all() and (amap[:, :, frame] == 0).all()
    assert (amap[:, ~frame][:, :, ~frame] != 0).any()


def test_bad_keys_are_named():
    backbone = FeatureExtractor("efficientnet_lite0", (1, 2, 3), weights="package")
    with pytest.raises(TexadError, match="method.score"):
        BlindVAEMethod(backbone, score="mean")
    with pytest.raises(TexadError, match="method.patch_size"):
        BlindVAEMethod(backbone, patch_size=6)
    with pytest.raises(TexadError, match="method.patch_size"):
        BlindVAEMethod(backbone, patch_size=7, feature_input_size=32)


def test_residual_norm_and_fca_maps_differ_on_the_same_vae():
    batch = Batch(image=torch.randn(1, 3, 64, 64), label=torch.ones(1, dtype=torch.long), path=["x"],
                  defect_type=["x"])
    a = BlindVAEMethod(None, features="pixels", hidden=16, latent=4, zero_border=0)
    b = BlindVAEMethod(None, features="pixels", hidden=16, latent=4, zero_border=0, score="residual_norm")
    b.model.vae.load_state_dict(a.model.vae.state_dict())
    ma, mb = a.predict_maps(batch)["anomaly_map"], b.predict_maps(batch)["anomaly_map"]
    assert ma.shape == mb.shape == (1, 64, 64) and not torch.allclose(ma, mb)


def test_blind_setting_on_a_folder_without_test_images_is_a_clear_error(tmp_path):
    from conftest import compose_cfg

    root = tmp_path / "tiny"
    (root / "train" / "good").mkdir(parents=True)
    (root / "test").mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 40, 90, 90)).save(root / "train" / "good" / f"{i:03d}.png")
    from texad.pipeline import build

    cfg = compose_cfg("train", ["method=blind_vae", "setting=blind", "dataset=folder", f"dataset.root={root}",
                                "dataset.image_size=64", "logger=none"], tmp_path / "run")
    dm, _ = build(cfg)
    with pytest.raises(TexadError, match="no test images|needs a test split"):
        dm.setup("fit")
