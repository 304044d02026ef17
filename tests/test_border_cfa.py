"""CFA's maps on normal images: no hot border by default; the official behaviour stays reachable.

Measured on the held-out validation normals (never the test set) with the memory bank alone
(epochs=0: the artifact comes from the bank and the backbone's zero padding, not from training).
"""

from __future__ import annotations

import pytest
import torch

from conftest import compose_cfg
from texad.metrics.border import ring_ratio
from texad.pipeline import build

SIZE = 128
BASE = [
    "dataset=textures/gravel", f"dataset.generated_size={SIZE}", f"dataset.image_size={SIZE}", "dataset.n_train=20",
    "dataset.n_test_good=2", "dataset.n_per_type=1", "dataset.val_fraction=0.3", "method.epochs=0", "logger=none",
    "trainer.enable_progress_bar=false",
]


def normal_val_maps(tmp_path, *overrides: str) -> torch.Tensor:
    import lightning as L

    cfg = compose_cfg("train", [*BASE, *overrides], tmp_path)
    L.seed_everything(cfg.seed)
    datamodule, method = build(cfg)
    datamodule.setup("fit")
    trainer = L.Trainer(max_epochs=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(method, datamodule=datamodule)  # builds the memory bank only
    method.eval()
    maps = []
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            out = method.predict_maps(batch)
            maps.append(out["anomaly_map"][batch.label == 0])
    return torch.cat(maps)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_default_cfa_maps_have_no_hot_border_and_the_official_rule_does(tmp_path):
    # measured (gravel 128², bank only): official 0.81 (zero padding makes border cells unlike the rest; at
    # 256² after training the corners run hot instead, 1.2), input padding alone 1.45 (mirrored context varies
    # more from image to image at the border), padding + per-location calibration 1.005
    default = ring_ratio(normal_val_maps(tmp_path / "default"))
    official = ring_ratio(normal_val_maps(
        tmp_path / "official", "method.input_padding=0", "method.score=softmin", "method.calibration=none"
    ))
    assert 0.9 <= default <= 1.1, default
    assert not 0.9 <= official <= 1.1, official
