"""Time the whole FCA method per image (resize, backbone, FCA, upsample), as ``predict_maps`` runs it.

The speed goal (DESIGN, issue 4) is per *image*, so this times what a user waits for, not FCA alone
(``bench/fca_speed.py`` times the core on random maps). Called by ``bench/fca_speed.py --method``
and by the lead's benchmark.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from texad.data.batch import Batch

__all__ = ["time_fca"]


def time_fca(features: str = "backbone", image_size: int = 256, feature_input_size: int | None = 1024,
             patch_size: int = 9, layers: tuple[int, ...] = (2,), backbone: str = "efficientnet_lite0",
             repeats: int = 3, threads: int | None = None, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Median and minimum seconds per image of ``FCAMethod.predict_maps`` on one random image.

    ``threads`` sets ``torch.set_num_threads`` for the call (restored afterwards); None keeps it.
    Content does not change FCA's cost (it counts ranks), so a random image is a fair input.
    """
    from texad.backbones import FeatureExtractor
    from texad.methods.fca.lightning_model import FCAMethod

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        extractor = None
        if features == "backbone":
            extractor = FeatureExtractor(backbone, layers=layers, weights="package" if backbone == "efficientnet_lite0"
                                         else "timm", mean=(0.5,) * 3, std=(0.5,) * 3)
        method = FCAMethod(extractor, features=features, layers=layers, feature_input_size=feature_input_size,
                           patch_size=patch_size).to(device).eval()
        image = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed)).to(device)
        batch = Batch(image=image, label=torch.zeros(1, dtype=torch.long), path=["bench"], defect_type=["good"])
        with torch.inference_mode():
            method.predict_maps(Batch(image=image[..., :64, :64], label=batch.label, path=batch.path,
                                      defect_type=batch.defect_type)) if features == "pixels" else None
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                method.predict_maps(batch)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            feats = method.feature_map(image)
        return {
            "features": features,
            "feature_map": list(feats.shape[1:]),
            "image_size": image_size,
            "feature_input_size": feature_input_size if features == "backbone" else None,
            "patch_size": patch_size,
            "seconds_median": sorted(times)[len(times) // 2],
            "seconds_min": min(times),
            "threads": torch.get_num_threads(),
            "device": device,
        }
    finally:
        torch.set_num_threads(before)
