"""Small copies of each clustered image and its map, kept for the cluster grid (figures.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

THUMB = 96  # side of the thumbnails kept per clustered image for the cluster grid


def thumbnail(image: torch.Tensor, display: tuple[tuple[float, ...], tuple[float, ...]] | None) -> torch.Tensor:
    """uint8 (3, THUMB, THUMB) of a normalised input image (`display`: the datamodule's mean and std;
    None: min–max stretched), for the cluster grid."""
    small = F.interpolate(image[None].float(), size=(THUMB, THUMB), mode="bilinear", align_corners=False)[0]
    if display is not None:
        mean = torch.tensor(display[0], device=small.device).view(-1, 1, 1)
        std = torch.tensor(display[1], device=small.device).view(-1, 1, 1)
        small = small * std + mean
    else:
        small = (small - small.min()) / (small.max() - small.min()).clamp(min=1e-8)
    return (small.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def thumbnail_map(full_map: torch.Tensor) -> torch.Tensor:
    """(THUMB, THUMB) float copy of an (H, W) anomaly map, for the map contour of the cluster grid."""
    return F.interpolate(full_map[None, None], size=(THUMB, THUMB), mode="bilinear", align_corners=False)[0, 0].cpu()
