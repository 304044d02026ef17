"""An image's anomaly score from its map: the maximum, or the mean of its top pixels."""

from __future__ import annotations

import torch

from texad.errors import TexadError

__all__ = ["IMAGE_SCORES", "image_score"]

IMAGE_SCORES = ("max", "top_mean")


def image_score(maps: torch.Tensor, rule: str = "max", fraction: float = 0.01) -> torch.Tensor:
    """(B,H,W) maps → (B,) image scores: the map's maximum (the papers' rule), or `top_mean`: the mean of
    its top `fraction` of pixels (at least one), which one extreme pixel cannot decide alone."""
    flat = maps.flatten(1)
    if rule == "max":
        return flat.amax(1)
    if rule == "top_mean":
        if not 0.0 < fraction <= 1.0:
            raise TexadError(f"method.image_score_fraction must be in (0, 1], got {fraction}")
        k = max(1, int(round(fraction * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(1)
    raise TexadError(f"method.image_score must be one of {list(IMAGE_SCORES)}, got {rule!r}")
