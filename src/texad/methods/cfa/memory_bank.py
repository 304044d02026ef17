"""CFA's memory bank of normal centroids (its nearest-centroid search: `texad.methods.components.nearest`).

The bank is φ₀ applied to the per-location mean feature of the normal training set (φ₀ is linear,
so this equals the running mean of φ₀(p) of the official code), optionally compressed by k-means
(γ_c). It is built once, before training, and then fixed; it is a buffer, so it lives in checkpoints.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from sklearn.cluster import KMeans
from torch import nn

from texad.methods.components.fitted_state import FittedBuffers


class MemoryBank(FittedBuffers):
    """Fixed centroids (M, D'), accumulated from sums of features so ranks can be reduced exactly."""

    fitted_buffers = ("centroids",)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("centroids", torch.empty(0))
        self.register_buffer("feature_sum", torch.empty(0), persistent=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64), persistent=False)

    @property
    def is_built(self) -> bool:
        return self.centroids.numel() > 0

    def reset(self) -> None:
        self.feature_sum = torch.empty(0, device=self.count.device)
        self.count = torch.zeros((), dtype=torch.float64, device=self.count.device)

    def accumulate(self, features: torch.Tensor) -> None:
        """Add a batch of (B,C,H,W) frozen features to the per-location sum (float64)."""
        s = features.detach().double().sum(0)
        self.feature_sum = s if self.feature_sum.numel() == 0 else self.feature_sum + s
        self.count = self.count + features.shape[0]

    def finalize(self, descriptor: nn.Module, gamma_c: int = 1, seed: int = 0) -> None:
        """Reduce across DDP ranks, take the mean map, apply φ₀, flatten, optionally k-means."""
        total, count = self.feature_sum, self.count.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        if count.item() == 0:
            raise RuntimeError("memory bank: no training features were accumulated")
        mean = (total / count).float().unsqueeze(0)
        with torch.no_grad():
            phi0 = descriptor(mean)[0]  # (D', H, W)
        centroids = phi0.flatten(1).t().contiguous()  # (H·W, D')
        if gamma_c > 1:

            n = max(1, centroids.shape[0] // gamma_c)
            km = KMeans(n_clusters=n, max_iter=3000, n_init=1, random_state=seed)
            km.fit(centroids.cpu().double().numpy())
            centroids = torch.from_numpy(km.cluster_centers_).to(centroids)
        self.centroids = centroids
        self.reset()
