"""PatchCore (Roth et al., CVPR 2022) as a pure torch model: patch features, coreset bank, scoring.

Follows the paper and its official code (amazon-science/patchcore-inspection):

* locally aware patch features: two mid-level backbone layers (WRN50 layer2 + layer3 in the paper;
  ``layers`` are timm out indices, [2, 3] = strides 8 and 16 for efficientnet_lite0 and resnets),
  each averaged over its 3×3 neighbourhood (stride 1), the coarser one bilinearly resampled at the
  finer one's true cell centres (``texad.geometry``), concatenated. The official code then shrinks each patch vector by adaptive average
  pooling to 1024 dims; with efficientnet_lite0 the concatenation has 152 dims, so nothing is
  shrunk here.
* memory bank: greedy k-center coreset of the training patches (``coreset_fraction``, 10 % by
  default), selected on a seeded Gaussian random projection to ``projection_dim`` (128, as the
  paper's Johnson–Lindenstrauss projection); the bank keeps the unprojected features.
* scoring: exact nearest-neighbour distance of each test patch to the bank
  (texad's chunked search, `texad.methods.components.nearest`), bilinearly upsampled to the input size and
  blurred with a Gaussian of σ = 4; image score = the largest patch distance, optionally with the
  paper's reweighting (Eq. 7): ``s = (1 − exp‖m* − n*‖ / Σ_{n∈N_b(n*)} exp‖m* − n‖) · s*``.
  The official code does not reweight (its score is the max), so ``reweight`` is off by default.

The greedy selection (`greedy_coreset`) is the cost of a fit. It is the exact greedy algorithm
(the same picks as recomputing every point's distance to the newest centre at every step, see the
test) organised so that it runs at matrix-product speed instead of memory speed:

* points are cut into blocks of ``block_rows``; each block keeps its points' distance to the
  nearest centre *as of the last time it was updated*, and the largest of them, an upper bound;
* distances only shrink as centres are added, so the block with the largest bound is updated
  (against all centres added since its last update, one matrix product) until the largest bound
  belongs to an up-to-date block: its farthest point is then the true farthest point;
* blocks far from new centres are rarely touched; updates batch many centres at once (float32,
  ‖x‖² − 2x·c + ‖c‖²).

The first centre is a seeded random patch (the official code starts from an approximate
farthest point, anomalib from a random one). The selection stops early only where it cannot change
any score: when every remaining patch coincides with a selected one (squared distance below
1e-5·‖x‖², the rounding noise of the float32 expansion, counts as 0).
Ties in float32 distances may be broken differently from a float64 computation.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from texad.backbones import FeatureExtractor, concat_layers
from texad.errors import TexadError
from texad.geometry import Grid, resample
from texad.methods.components.fitted_state import FittedBuffers
from texad.methods.components.gaussian import gaussian_blur2d
from texad.methods.components.layers import select_layers
from texad.methods.components.nearest import nearest_sq_distances
from texad.methods.components.score_calibration import fold_splits


# squared distances below ROUNDING·‖x‖² are float32 rounding noise of ‖x‖² − 2x·c + ‖c‖² (D·ε ≈ 1e-5)
ROUNDING = 1e-5


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Seeded Gaussian projection (N, D) → (N, dim) with entries N(0, 1/dim); identity if D <= dim."""
    if dim <= 0 or features.shape[1] <= dim:
        return features
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    matrix = torch.randn(features.shape[1], dim, generator=gen) / math.sqrt(dim)
    return features @ matrix.to(features)


def greedy_coreset(
    points: torch.Tensor, n_select: int, seed: int = 0, block_rows: int = 1024
) -> torch.Tensor:
    """Indices (in pick order) of the greedy k-center selection of `n_select` rows of `points` (N, D).

    Step t picks the row farthest (Euclidean) from the rows picked so far; the first row is drawn
    with `seed`. Exact, with lazily updated blocks (see the module docstring). Returns fewer indices
    when every remaining row already coincides with a picked one.
    """
    n, d = points.shape
    n_select = int(min(max(n_select, 0), n))
    if n_select == 0:
        return torch.zeros(0, dtype=torch.long)
    x = points.detach().float().contiguous()
    sq = (x * x).sum(1)
    block_rows = max(1, int(block_rows))
    n_blocks = -(-n // block_rows)
    nearest = torch.full((n,), float("inf"), device=x.device)
    bound = torch.full((n_blocks,), float("inf"), device=x.device)  # max of `nearest` per block, stale
    applied = [0] * n_blocks  # centres already folded into each block
    centres = x.new_empty(n_select, d)
    centre_sq = x.new_empty(n_select)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    first = int(torch.randint(n, (1,), generator=gen))
    picks = [first]
    nearest[first] = 0.0
    centres[0], centre_sq[0] = x[first], sq[first]
    for t in range(1, n_select):
        while True:
            b = int(torch.argmax(bound))
            start = applied[b]
            if start == t:
                break
            lo, hi = b * block_rows, min(n, (b + 1) * block_rows)
            dist = torch.addmm(sq[lo:hi, None] + centre_sq[None, start:t], x[lo:hi], centres[start:t].t(), alpha=-2.0)
            closest = dist.amin(1)
            # below ~1e-5·‖x‖² the float32 expansion is rounding noise: the point coincides with a centre
            closest = torch.where(closest <= ROUNDING * sq[lo:hi], torch.zeros_like(closest), closest)
            block = torch.minimum(nearest[lo:hi], closest)
            nearest[lo:hi] = block
            bound[b] = block.max()
            applied[b] = t
        if float(bound[b]) <= 0.0:
            break  # every row coincides with a picked one: more picks change no distance
        lo = b * block_rows
        pick = lo + int(torch.argmax(nearest[lo : lo + block_rows]))
        picks.append(pick)
        nearest[pick] = 0.0  # exactly; the block's bound stays a valid (stale) upper bound
        centres[t], centre_sq[t] = x[pick], sq[pick]
    return torch.tensor(picks, dtype=torch.long)


class PatchCoreModel(FittedBuffers):
    """Frozen backbone → locally aware patch features → coreset memory bank → anomaly maps."""

    fitted_buffers = ("memory_bank",)

    def __init__(
        self,
        backbone: FeatureExtractor,
        layers: Sequence[int] = (2, 3),
        pool: int = 3,
        blur_sigma: float = 4.0,
        reweight: bool = False,
        num_neighbors: int = 9,
        distance_budget_mb: float = 256.0,
    ) -> None:
        super().__init__()
        if int(pool) < 1 or int(pool) % 2 == 0:
            raise TexadError(f"method.pool must be a positive odd integer, got {pool}")
        if int(num_neighbors) < 1:
            raise TexadError(f"method.num_neighbors must be >= 1, got {num_neighbors}")
        self.backbone = backbone
        self.positions = select_layers(backbone, layers)
        self.pool, self.blur_sigma = int(pool), float(blur_sigma)
        self.reweight, self.num_neighbors = bool(reweight), int(num_neighbors)
        self.budget_mb = float(distance_budget_mb)
        self.register_buffer("memory_bank", torch.empty(0))

    @property
    def bank_built(self) -> bool:
        return self.memory_bank.numel() > 0

    @property
    def feature_dim(self) -> int:
        return sum(self.backbone.channels[p] for p in self.positions)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """(B, D, h, w) locally aware patch features on the finest chosen layer's cells, and their grid."""
        maps = self.backbone(images)
        grids = self.backbone.grids(images.shape[-2:], maps)
        return concat_layers([maps[p] for p in self.positions], [grids[p] for p in self.positions], self.pool)

    @staticmethod
    def flatten(features: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) → (B·h·w, D), row-major per image."""
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])

    def set_bank(self, patches: torch.Tensor, indices: torch.Tensor) -> None:
        self.memory_bank = patches[indices.to(patches.device)].float().contiguous().to(self.memory_bank.device)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps (B, H, W) at input size and image scores (B,)."""
        if not self.bank_built:
            raise TexadError("PatchCore has no memory bank: fit it first (or load a fitted checkpoint)")
        feats, grid = self.features(images)
        b, _, h, w = feats.shape
        patches = self.flatten(feats)
        sq, idx = nearest_sq_distances(patches, self.memory_bank, 1, self.budget_mb)
        dist = sq[:, 0].sqrt().view(b, h * w)
        scores, where = dist.max(1)
        if self.reweight:
            rows = torch.arange(b, device=dist.device) * (h * w) + where
            scores = scores * self.reweighting(patches[rows], idx[rows, 0])
        maps = resample(dist.view(b, h, w), grid, tuple(images.shape[-2:]))
        return gaussian_blur2d(maps, self.blur_sigma), scores

    def heldout_maps(self, images: torch.Tensor, patches: torch.Tensor, picks: torch.Tensor, cells: tuple[int, int],
                     grid: Grid, size: tuple[int, int], folds: int, max_images: int) -> torch.Tensor:
        """Maps (M, H, W) of held-out training images for the image-score calibration.

        k-fold split of the training images (`score_calibration.fold_splits`): fold f's images are scored
        against the coreset entries that came from the other folds' images, so no image meets its own
        patches. Deviation, for cost: the fold bank is the full coreset minus fold f's picks, not a
        coreset selected anew on the other folds (k greedy selections would multiply the fit time);
        held-out maps thus run slightly higher than with a re-selected bank.
        """
        n, hw, _ = images.shape
        origin = picks.cpu() // hw
        out = []
        for held, keep in fold_splits(origin, n, folds, max_images):
            bank = patches[picks[keep.to(picks.device)].to(patches.device)].float()
            sq, _ = nearest_sq_distances(images[held.to(images.device)].reshape(-1, images.shape[-1]).float(),
                                         bank, 1, self.budget_mb)
            dist = sq[:, 0].sqrt().view(len(held), *cells)
            out.append(gaussian_blur2d(resample(dist, grid, size), self.blur_sigma))
        return torch.cat(out)

    def reweighting(self, test_patches: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Eq. 7's factor 1 − softmax(−)… : 1 − exp‖m − n*‖ / Σ_{n ∈ N_b(n*)} exp‖m − n‖ per image.

        N_b(n*) are the b bank entries nearest to n* (n* itself included, at distance 0).
        """
        bank = self.memory_bank
        b = min(self.num_neighbors, bank.shape[0])
        _, support = nearest_sq_distances(bank[nearest], bank, b, self.budget_mb)  # (B, b)
        # make sure n* itself is in its neighbourhood (duplicates in the bank could push it out)
        has_self = (support == nearest[:, None]).any(1)
        support[~has_self, -1] = nearest[~has_self]
        dists = (test_patches[:, None, :] - bank[support]).pow(2).sum(-1).sqrt()  # (B, b)
        own = (test_patches - bank[nearest]).pow(2).sum(-1).sqrt()
        # exp(own) / Σ exp(d): computed as exp(own − logsumexp(d)) for stability
        return 1.0 - torch.exp(own - torch.logsumexp(dists, dim=1))
