"""CFA's memory bank of normal centroids and a chunked nearest-centroid search.

The bank is φ₀ applied to the per-location mean feature of the normal training set (φ₀ is linear,
so this equals the running mean of φ₀(p) of the official code), optionally compressed by k-means
(γ_c). It is built once, before training, and then fixed; it is a buffer, so it lives in checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from texad.ops import adopt_saved_shapes, chunk_rows_for_budget


# On CPU, rows per chunk never exceed this: a (rows × M) distance block then stays in the caches
# while it is reduced, which measured faster than whole-image chunks even when the budget allows
# them. On a GPU, fewer and larger chunks are faster (kernel launches dominate small ones).
MAX_CHUNK_ROWS = 1024


def search_chunk_rows(n_centroids: int, budget_mb: float, device: torch.device) -> int:
    """Query rows per chunk of the search: as many as `budget_mb` allows, at most MAX_CHUNK_ROWS on CPU."""
    rows = chunk_rows_for_budget(n_centroids, 4 * 3, budget_mb)
    return min(rows, MAX_CHUNK_ROWS) if device.type == "cpu" else rows


def _smallest_k(dist: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and column indices of the k smallest entries of each row of `dist` (R, M), in no set order.

    Exact, and cheaper than one top-k over M columns: the columns are cut into blocks of `block`;
    the k smallest entries of a row lie in the k blocks with the smallest minima (any other block's
    minimum is ≥ k distinct entries already found), so a top-k over the M/block block minima and
    then over those k·block candidates selects them. `dist` must have M divisible by `block`.
    """
    rows, m = dist.shape
    if k * block >= m:
        return dist.topk(k, dim=1, largest=False, sorted=False)
    blocked = dist.view(rows, m // block, block)
    blocks = blocked.amin(dim=2).topk(k, dim=1, largest=False, sorted=False).indices  # (R, k)
    candidates = blocked.gather(1, blocks[:, :, None].expand(-1, -1, block)).view(rows, k * block)
    values, picked = candidates.topk(k, dim=1, largest=False, sorted=False)
    return values, blocks.gather(1, picked // block) * block + picked % block


def nearest_sq_distances(
    queries: torch.Tensor, centroids: torch.Tensor, k: int, budget_mb: float = 256.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """k smallest squared Euclidean distances (ascending) and their centroid indices.

    queries (N,D), centroids (M,D). Exact global search: every centroid is compared with every
    query (CFA's scores are not sharply separated, so pruning bounds would cut nothing). The N×M
    matrix is never held whole: rows are processed in chunks sized by `budget_mb` (and at most
    MAX_CHUNK_ROWS on CPU), so peak memory is set by the budget, not by N·M. Ranking uses
    ‖c‖² − 2q·c (‖q‖² is constant along a row). When the queries need gradients (training), the
    returned distances are recomputed as ‖q − c‖² from the selected centroids, so gradients flow to
    the queries and autograd keeps only N·k·D values. Without gradients (scoring) they are the
    ranking values plus ‖q‖², clamped at 0: the expansion the official code scores with, and no
    N·k·D gather (a third of the search time at 64² maps).
    """
    k = min(k, centroids.shape[0])
    m = centroids.shape[0]
    block = max(1, math.isqrt(m))
    padded = -(-m // block) * block
    with torch.no_grad():
        bank = centroids.detach()
        q = queries.detach()
        # One product gives the ranking: [q, 1] · [−2c, ‖c‖²] = ‖c‖² − 2q·c. (addmm with a broadcast
        # ‖c‖² row first copies it into every output row: a whole extra pass over the N×M block.)
        ranking_bank = torch.cat([-2.0 * bank, (bank**2).sum(1, keepdim=True)], dim=1)
        if padded > m:  # pad with centroids at infinite distance so every block is full
            pad = ranking_bank.new_zeros(padded - m, ranking_bank.shape[1])
            pad[:, -1] = float("inf")
            ranking_bank = torch.cat([ranking_bank, pad])
        ranking_bank_t = ranking_bank.t().contiguous()
        ranking_queries = torch.cat([q, q.new_ones(q.shape[0], 1)], dim=1)
        rows = search_chunk_rows(padded, budget_mb, bank.device)
        value_chunks, idx_chunks = [], []
        for start in range(0, q.shape[0], rows):
            ranking = torch.mm(ranking_queries[start : start + rows], ranking_bank_t)
            values, indices = _smallest_k(ranking, k, block)
            value_chunks.append(values)
            idx_chunks.append(indices)
    if not idx_chunks:
        empty = queries.new_empty(0, k)
        return empty, empty.long()
    idx = torch.cat(idx_chunks)
    if torch.is_grad_enabled() and (queries.requires_grad or centroids.requires_grad):
        dist2 = ((queries.unsqueeze(1) - centroids[idx]) ** 2).sum(-1)
    else:
        dist2 = (torch.cat(value_chunks) + (q**2).sum(1, keepdim=True)).clamp_min_(0.0)
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
        adopt_saved_shapes(self, state_dict, prefix, ("centroids",))
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
