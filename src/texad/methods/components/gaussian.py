"""Gaussian kernels and the separable blur of anomaly maps, for every method that smooths."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gaussian_blur2d", "gaussian_kernel1d", "gaussian_taps"]


def gaussian_taps(size: int, sigma: float, dtype=torch.float64) -> torch.Tensor:
    """A Gaussian sampled on `size` taps centred on the middle one, normalised to sum 1 (FCA's patch
    weights and blurs, the clustering's feature blur)."""
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """float32 `gaussian_taps` of radius round(truncate·σ) (scipy's gaussian_filter convention)."""
    radius = max(1, int(truncate * sigma + 0.5))
    return gaussian_taps(2 * radius + 1, sigma).float()


def gaussian_blur2d(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of (B,H,W) or (B,C,H,W) maps with reflect padding; σ ≤ 0 is a no-op."""
    if sigma <= 0:
        return maps
    squeeze = maps.dim() == 3
    x = maps[:, None] if squeeze else maps
    b, c, h, w = x.shape
    k = gaussian_kernel1d(sigma, truncate).to(x)
    r = k.numel() // 2
    x = x.reshape(b * c, 1, h, w)
    # reflect padding needs pad < size; very small maps fall back to replicate
    mode_h = "reflect" if r < h else "replicate"
    mode_w = "reflect" if r < w else "replicate"
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode_h), k.view(1, 1, -1, 1))
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode_w), k.view(1, 1, 1, -1))
    x = x.reshape(b, c, h, w)
    return x[:, 0] if squeeze else x
