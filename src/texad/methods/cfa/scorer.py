"""CFA's anomaly score: the softmin-weighted nearest distance, upsampled and smoothed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from texad.ops import gaussian_blur2d


def softmin_nearest_score(sq_dist: torch.Tensor) -> torch.Tensor:
    """(N,K) ascending squared distances → (N,) d₁ · softmin(d₁..d_K)₁ (clamped before sqrt)."""
    d = sq_dist.clamp_min(0).sqrt()
    return torch.softmax(-d, dim=1)[:, 0] * d[:, 0]


def finish_map(score: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """(B,h,w) feature-resolution scores → (B,H,W): bilinear upsampling, then Gaussian blur σ."""
    up = F.interpolate(score[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur2d(up, sigma)
