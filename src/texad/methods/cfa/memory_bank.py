"""CFA's memory bank of normal centroids and a chunked nearest-centroid search.

The bank is φ₀ applied to the per-location mean feature of the normal training set (φ₀ is linear,
so this equals the running mean of φ₀(p) of the official code), optionally compressed by k-means
(γ_c). It is built once, before training, and then fixed; it is a buffer, so it lives in checkpoints.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from texad.ops import chunk_rows_for_budget


def nearest_sq_distances(
    queries: torch.Tensor, centroids: torch.Tensor, k: int, budget_mb: float = 256.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """k smallest squared Euclidean distances (ascending) and their centroid indices.

    queries (N,D), centroids (M,D). The N×M distance matrix is never held whole: rows are processed
    in chunks sized by `budget_mb`, so peak memory is set by the budget, not by N·M. The returned
    distances are recomputed exactly from the selected centroids, so gradients flow to the queries
    (and through autograd only N·k·D values are kept).
    """
    k = min(k, centroids.shape[0])
    c_sq = (centroids.detach() ** 2).sum(1)
    rows = chunk_rows_for_budget(centroids.shape[0], 4 * 2, budget_mb)
    idx_chunks = []
    with torch.no_grad():
        q = queries.detach()
        for start in range(0, q.shape[0], rows):
            part = q[start : start + rows]
            d = torch.addmm(c_sq.unsqueeze(0), part, centroids.detach().t(), alpha=-2.0)
            d.add_((part**2).sum(1, keepdim=True))
            idx_chunks.append(d.topk(k, dim=1, largest=False).indices)
    idx = torch.cat(idx_chunks)
    dist2 = ((queries.unsqueeze(1) - centroids[idx]) ** 2).sum(-1)
    dist2, order = dist2.sort(dim=1)
    return dist2, idx.gather(1, order)


class MemoryBank(nn.Module):
    """Fixed centroids (M, D'), accumulated from sums of features so ranks can be reduced exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("centroids", torch.empty(0))
        self.register_buffer("feature_sum", torch.empty(0), persistent=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Adopt the saved bank's shape (the empty placeholder cannot hold it)."""
        key = prefix + "centroids"
        if key in state_dict:
            self.centroids = torch.empty_like(state_dict[key], device=self.centroids.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
            from sklearn.cluster import KMeans

            n = max(1, centroids.shape[0] // gamma_c)
            km = KMeans(n_clusters=n, max_iter=3000, n_init=1, random_state=seed)
            km.fit(centroids.cpu().double().numpy())
            centroids = torch.from_numpy(km.cluster_centers_).to(centroids)
        self.centroids = centroids
        self.reset()
