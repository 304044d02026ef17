"""Border test (issue 12) for FCA and blind VAE: on normal images of an embedded set, the default map's
border ring (texad.metrics.border.ring_ratio) stays within 0.90-1.10 of the interior, while the
official behaviour (one documented option set per method) does not, so the test can fail."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_cfg
from texad.data.batch import Batch
from texad.metrics.border import ring_ratio

pytestmark = pytest.mark.usefixtures("one_thread")

# 128² embedded images, backbone input 256² (the default's 2x resize of a 256² image scaled down)
TINY_SET = ["dataset=textures/gravel", "dataset.generated_size=128", "dataset.image_size=128", "dataset.n_train=6",
            "dataset.n_test_good=4", "dataset.n_per_type=1", "dataset.val_fraction=0", "dataset.n_val_good=0",
            "logger=none",
            "method.feature_input_size=256"]
BOUNDS = (0.90, 1.10)


def _method_and_normals(method: str, tmp_path: Path, **overrides):
    cfg = compose_cfg("train", [f"method={method}", *TINY_SET], tmp_path / "run")
    datamodule = instantiate(cfg.dataset, _convert_="all")
    datamodule.setup("fit")
    backbone = instantiate(cfg.backbone, _convert_="all")
    train = datamodule.train_dataset()
    images = torch.stack([train[i]["image"] for i in range(len(train))])
    batch = Batch(image=images, label=torch.zeros(len(images), dtype=torch.long), path=[str(i) for i in range(len(images))],
                  defect_type=["good"] * len(images))
    return instantiate(cfg.method, backbone=backbone, _convert_="all", **overrides), batch


def test_fca_default_has_no_border_ring_and_the_official_option_has_one(tmp_path):
    # Measured (6 training normals of embedded gravel at 128², 64² feature map): default 0.99,
    # official (input_padding=0, border=official) 1.66; grass 0.95 vs 1.59.
    ratios = {}
    for name, overrides in {"default": {}, "official": {"input_padding": 0, "border": "official"}}.items():
        method, batch = _method_and_normals("fca", tmp_path, **overrides)
        with torch.inference_mode():
            ratios[name] = ring_ratio(method.eval().predict_maps(batch)["anomaly_map"])
    assert BOUNDS[0] <= ratios["default"] <= BOUNDS[1], ratios
    assert not BOUNDS[0] <= ratios["official"] <= BOUNDS[1], ratios


def _fit_vae(method, images: torch.Tensor, steps: int = 80, vectors: int = 1024) -> None:
    """A short VAE fit on the images' own scaled features (as on_fit_start/training_step, without a trainer)."""
    torch.manual_seed(0)
    feats = method.scaled_features(images)
    x = feats.permute(1, 0, 2, 3).reshape(1, feats.shape[1], -1, 1)
    opt = torch.optim.AdamW(method.model.vae.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(steps):
        xb = x[:, :, torch.randperm(x.shape[2])[:vectors]]
        recon, mu, logvar = method.model.vae(xb)
        loss = method.model.vae.loss(xb, recon, mu, logvar, 1e-3)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    method.eval()


def _blind_ring(tmp_path: Path, **overrides) -> float:
    """The blind protocol in small: the VAE is fitted (and calibrated, where the method calibrates) on
    the unlabelled test split, normals and defects alike; the ring is measured on its normal images."""
    method, _ = _method_and_normals("blind_vae", tmp_path, **overrides)
    cfg = compose_cfg("train", ["method=blind_vae", *TINY_SET], tmp_path / "run")
    datamodule = instantiate(cfg.dataset, _convert_="all")
    datamodule.setup("test")
    test = datamodule.test_dataset()
    items = [test[i] for i in range(len(test))]
    images = torch.stack([item["image"] for item in items])
    normal = torch.tensor([int(item["label"]) == 0 for item in items])
    _fit_vae(method, images)
    with torch.inference_mode():
        method.calibrate(method.scaled_features(images))
        batch = Batch(image=images[normal], label=torch.zeros(int(normal.sum()), dtype=torch.long),
                      path=[str(i) for i in range(int(normal.sum()))], defect_type=["good"] * int(normal.sum()))
        return ring_ratio(method.predict_maps(batch)["anomaly_map"])


@pytest.mark.slow
def test_blind_vae_official_option_clears_the_border_and_the_default_does_not(tmp_path):
    official = _blind_ring(tmp_path, input_padding=0, border="official", zero_border=5, calibration="none")
    default = _blind_ring(tmp_path)
    padded = _blind_ring(tmp_path, calibration="none")
    unpadded = _blind_ring(tmp_path, input_padding=0, calibration="none")
    unpadded_calibrated = _blind_ring(tmp_path, input_padding=0)
    # Measured (9 images of embedded gravel at 128², 32² feature map, 80-step VAE fits): official 0.0
    # (its 5-cell frame is zeroed), default 1.03; without calibration 1.07 (padded) and 3.73 (unpadded);
    # unpadded with calibration 1.69. (On 256² brick, 40 epochs, padded without calibration: 1.21.)
    assert official < BOUNDS[0]
    assert default > BOUNDS[0]  # a zeroed border is not a fix: the default scores the border
    assert padded < unpadded  # input padding removes most of the border excess ...
    assert unpadded_calibrated < 0.6 * unpadded  # ... and the calibration removes a border excess too


@pytest.mark.slow
def test_blind_vae_default_ring_is_within_bounds(tmp_path):
    assert BOUNDS[0] <= _blind_ring(tmp_path) <= BOUNDS[1]
