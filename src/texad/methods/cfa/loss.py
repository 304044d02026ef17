"""CFA's coupled-hypersphere loss with a learnable radius r.

anomalib's port never optimises r, so its repulsion term is identically zero; here r is a real
parameter (trained by the optimiser, as in the official code).
"""

from __future__ import annotations

import torch
from torch import nn


class CoupledHypersphereLoss(nn.Module):
    """(L_att + L_rep) / ν over squared distances to the K nearest and the next J centroids."""

    def __init__(self, k: int = 3, j: int = 3, r0: float = 1e-5, margin: float = 0.1, nu: float = 1e-3) -> None:
        super().__init__()
        # margin: the paper's and the official code's α of the repulsion term (texad keeps α for fusion weights)
        self.k, self.j, self.margin, self.nu = k, j, margin, nu
        self.radius = nn.Parameter(torch.tensor(float(r0)))

    def forward(self, sq_dist: torch.Tensor) -> torch.Tensor:
        """sq_dist: (N, ≥K+J) ascending squared distances of each patch to its nearest centroids."""
        r2 = self.radius**2
        attract = torch.relu(sq_dist[:, : self.k] - r2).mean()
        loss = attract
        if self.j > 0:
            # hard negatives are the J centroids after the K nearest (the official code sliced from J)
            repel = torch.relu(r2 - sq_dist[:, self.k : self.k + self.j] - self.margin).mean()
            loss = loss + repel
        return loss / self.nu
