"""CFA's patch descriptor: a 1×1 CoordConv that adapts frozen features to the target domain."""

from __future__ import annotations

import torch
from torch import nn


def coordinate_channels(batch: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(B,2,H,W): row then column coordinate, each linearly spaced in [-1, 1]."""
    rows = torch.linspace(-1.0, 1.0, height, device=like.device, dtype=like.dtype)
    cols = torch.linspace(-1.0, 1.0, width, device=like.device, dtype=like.dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))
    return grid.unsqueeze(0).expand(batch, -1, -1, -1)


class CoordConvDescriptor(nn.Module):
    """φ: features + 2 coordinate channels → 1×1 conv to `out_channels` (= D / γ_d).

    A plain Conv2d: the official code subclassed Conv2d and left an unused D×D weight behind.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, _, h, w = features.shape
        return self.conv(torch.cat([features, coordinate_channels(b, h, w, features)], dim=1))
