"""CFA's patch score from its K nearest squared distances (upsampling and blur: CFAModel).

- `softmin` (official): d₁ · softmin(d₁..d_K)₁. The softmin weight grows where the nearest centroid
  is isolated (a large gap to the 2nd): with a one-centroid-per-location bank and a zero-padded
  backbone that happens at the image corners, whose features are unique, so normal images peak
  there and the map maximum ranks images near chance.
- `nearest`: d₁, the plain nearest distance (PatchCore's rule); no weight from the gap.
"""

from __future__ import annotations

import torch


def softmin_nearest_score(sq_dist: torch.Tensor) -> torch.Tensor:
    """(N,K) ascending squared distances → (N,) d₁ · softmin(d₁..d_K)₁ (clamped before sqrt)."""
    d = sq_dist.clamp_min(0).sqrt()
    return torch.softmax(-d, dim=1)[:, 0] * d[:, 0]


def nearest_score(sq_dist: torch.Tensor) -> torch.Tensor:
    """(N,K) ascending squared distances → (N,) d₁ (clamped before sqrt)."""
    return sq_dist[:, 0].clamp_min(0).sqrt()


SCORERS = {"softmin": softmin_nearest_score, "nearest": nearest_score}
