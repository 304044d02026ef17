"""CFA's anomaly score: the softmin-weighted nearest distance (upsampling and blur: CFAModel)."""

from __future__ import annotations

import torch


def softmin_nearest_score(sq_dist: torch.Tensor) -> torch.Tensor:
    """(N,K) ascending squared distances → (N,) d₁ · softmin(d₁..d_K)₁ (clamped before sqrt)."""
    d = sq_dist.clamp_min(0).sqrt()
    return torch.softmax(-d, dim=1)[:, 0] * d[:, 0]
