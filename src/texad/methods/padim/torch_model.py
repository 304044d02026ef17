"""PaDiM (Defard et al., ICPR 2020) as a pure torch model: one Gaussian per feature-map location.

Follows the paper (the authors released no code; details where the paper is silent follow the
widely used re-implementation xiahaifeng1995/PaDiM-Anomaly-Detection-Localization-master and
anomalib's):

* embedding: backbone layers 1–3 (timm out indices; strides 4, 8, 16 as ResNet layer1–3), the
  coarser maps resampled onto the finest one's cells at their true centres (``texad.geometry``) and
  concatenated, then a seeded random subset of ``n_features`` channels (paper: 100 of 448 for
  ResNet18, 550 of 1792 for WRN50-2; efficientnet_lite0 gives 176 channels, 100 by default).
  Deviation: bilinearly (``layer_resampling``); both re-implementations take the nearest coarse cell,
  which rounds each fine cell's position and, with the true centres, biases it by a fraction of a coarse
  cell (``layer_resampling=nearest`` keeps their rule);
* per location (i, j): mean μ_ij and covariance Σ_ij = unbiased sample covariance + ε·I with
  ε = 0.01 (the paper's regularisation);
* score: Mahalanobis distance sqrt((x − μ)ᵀ Σ⁻¹ (x − μ)) per location, bilinearly resampled to the
  input size, Gaussian blur σ = 4; image score = the map's maximum.

Memory stays bounded: the covariance is accumulated batch by batch in float32 with Chan et al.'s
pairwise update (per-batch mean and centred scatter, merged into the running ones), processed in
chunks of ``chunk_locations`` locations, so nothing of size N·L·d (all training features) is ever
held; the largest objects are the running scatter and the precision matrices, L·d² floats each
(at 256², stride 4, d = 100: 4096·100² · 4 B = 164 MB). The inverse is taken in float64 per chunk
(Cholesky), stored as float32 precision matrices.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from texad.backbones import FeatureExtractor
from texad.errors import TexadError
from texad.geometry import Grid, resample
from texad.methods.components.fitted_state import FittedBuffers
from texad.methods.components.gaussian import gaussian_blur2d
from texad.methods.components.layers import select_layers
from texad.methods.components.score_calibration import fold_of


def random_channels(n_total: int, n_select: int, seed: int) -> torch.Tensor:
    """A seeded random subset (sorted) of `n_select` of `n_total` channel indices."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randperm(n_total, generator=gen)[:n_select].sort().values


class GaussianStatistics(nn.Module):
    """Running per-location mean and centred scatter (Chan et al.'s update), float32, in chunks."""

    def __init__(self, chunk_locations: int = 512) -> None:
        super().__init__()
        self.chunk = max(1, int(chunk_locations))
        self.count = 0
        self.mean: torch.Tensor | None = None  # (L, d)
        self.scatter: torch.Tensor | None = None  # (L, d, d): Σ (x − μ)(x − μ)ᵀ

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of embeddings x (B, L, d)."""
        b, n_loc, d = x.shape
        if self.mean is None:
            self.mean = x.new_zeros(n_loc, d, dtype=torch.float32)
            self.scatter = x.new_zeros(n_loc, d, d, dtype=torch.float32)
        n_old = self.count
        n_new = n_old + b
        for lo in range(0, n_loc, self.chunk):
            hi = min(n_loc, lo + self.chunk)
            xc = x[:, lo:hi].float().transpose(0, 1)  # (Lc, B, d)
            batch_mean = xc.mean(1)
            centred = xc - batch_mean[:, None]
            delta = batch_mean - self.mean[lo:hi]
            self.scatter[lo:hi] += torch.bmm(centred.transpose(1, 2), centred)
            if n_old:
                self.scatter[lo:hi] += (n_old * b / n_new) * delta[:, :, None] * delta[:, None, :]
            self.mean[lo:hi] += delta * (b / n_new)
        self.count = n_new

    def all_reduce(self) -> None:
        """Merge the statistics of all DDP ranks (every rank ends with the totals)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.mean.device)
        dist.all_reduce(count)
        total = float(count)
        local_mean = self.mean.clone()
        weighted = self.mean * self.count
        dist.all_reduce(weighted)
        self.mean = weighted / total
        for lo in range(0, self.mean.shape[0], self.chunk):
            hi = min(self.mean.shape[0], lo + self.chunk)
            delta = local_mean[lo:hi] - self.mean[lo:hi]
            self.scatter[lo:hi] += self.count * delta[:, :, None] * delta[:, None, :]
        dist.all_reduce(self.scatter)
        self.count = int(round(total))


class PaDiMModel(FittedBuffers):
    """Frozen backbone → random-channel embedding → per-location Gaussians → Mahalanobis maps."""

    fitted_buffers = ("mean", "precision")

    def __init__(
        self,
        backbone: FeatureExtractor,
        layers: Sequence[int] = (1, 2, 3),
        n_features: int = 100,
        epsilon: float = 0.01,
        blur_sigma: float = 4.0,
        chunk_locations: int = 512,
        layer_resampling: str = "bilinear",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if layer_resampling not in ("bilinear", "nearest"):
            raise TexadError(f"method.layer_resampling must be 'bilinear' or 'nearest', got {layer_resampling!r}")
        self.layer_resampling = layer_resampling
        self.backbone = backbone
        self.positions = select_layers(backbone, layers)
        total = sum(backbone.channels[p] for p in self.positions)
        if not 1 <= int(n_features) <= total:
            raise TexadError(f"method.n_features must be in [1, {total}] (channels of layers {list(layers)}), got {n_features}")
        if float(epsilon) < 0:
            raise TexadError(f"method.epsilon must be >= 0, got {epsilon}")
        self.epsilon, self.blur_sigma = float(epsilon), float(blur_sigma)
        self.chunk = max(1, int(chunk_locations))
        self.register_buffer("channels", random_channels(total, int(n_features), seed))
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("precision", torch.empty(0))
        self.register_buffer("map_size", torch.zeros(2, dtype=torch.long))

    @property
    def fitted(self) -> bool:
        return self.precision.numel() > 0

    def embedding(self, images: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """(B, d, h, w): chosen layers on the finest one's cells (at their true centres), random channels;
        and their grid."""
        maps = self.backbone(images)
        grids = self.backbone.grids(images.shape[-2:], maps)
        maps, grids = [maps[p] for p in self.positions], [grids[p] for p in self.positions]
        size = tuple(maps[0].shape[-2:])
        full = torch.cat([resample(m, g, size, grids[0], self.layer_resampling) for m, g in zip(maps, grids)], 1)
        return full.index_select(1, self.channels.to(full.device)), grids[0]

    @staticmethod
    def locations(emb: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) → (B, h·w, d)."""
        return emb.flatten(2).transpose(1, 2)

    def finalize(self, stats: GaussianStatistics, size: tuple[int, int]) -> None:
        """Mean and precision (Σ + εI)⁻¹ from the accumulated statistics (unbiased covariance)."""
        if stats.count < 2:
            raise TexadError(f"PaDiM needs at least 2 training images for a covariance, got {stats.count}")
        n_loc, d = stats.mean.shape
        eye = torch.eye(d, dtype=torch.float64, device=stats.mean.device)
        precision = stats.scatter  # overwritten in place, chunk by chunk: no second L·d² array
        for lo in range(0, n_loc, self.chunk):
            hi = min(n_loc, lo + self.chunk)
            cov = precision[lo:hi].double() / (stats.count - 1) + self.epsilon * eye
            precision[lo:hi] = torch.cholesky_inverse(torch.linalg.cholesky(cov)).float()
        stats.scatter = None
        self.mean = stats.mean.contiguous()
        self.precision = precision
        self.map_size = torch.tensor(list(size), dtype=torch.long, device=self.map_size.device)

    def mahalanobis(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) → (B, h, w) Mahalanobis distances, in chunks of locations."""
        b, d, h, w = emb.shape
        if (h, w) != tuple(int(s) for s in self.map_size):
            raise TexadError(
                f"PaDiM's Gaussians are per location of a {tuple(self.map_size.tolist())} feature map, but these "
                f"images give {h}x{w}: evaluate at the training image size (dataset.image_size)"
            )
        x = self.locations(emb).float()  # (B, L, d)
        out = x.new_empty(b, h * w)
        for lo in range(0, h * w, self.chunk):
            hi = min(h * w, lo + self.chunk)
            delta = (x[:, lo:hi] - self.mean[lo:hi]).transpose(0, 1)  # (Lc, B, d)
            m = (torch.bmm(delta, self.precision[lo:hi]) * delta).sum(-1)  # (Lc, B)
            out[:, lo:hi] = m.clamp_min(0).sqrt().t()
        return out.view(b, h, w)

    def heldout_maps(self, embs: torch.Tensor, grid: Grid, size: tuple[int, int], mean: torch.Tensor,
                     scatter: torch.Tensor, folds: int, max_images: int) -> torch.Tensor:
        """Maps (M, H, W) of held-out training images for the image-score calibration.

        k-fold split of the training embeddings `embs` (N, d, h, w): fold f's images are scored against
        Gaussians of the other folds, obtained exactly by removing fold f's mean and scatter from the
        totals (`mean` (L, d), `scatter` (L, d, d) of all N images; Chan et al.'s update run backwards),
        per chunk of locations, in float32 (the training fit inverts in float64; these distances only feed
        image-level statistics, and float32 is several times faster: the cost limits k).
        """
        n, _, h, w = embs.shape
        x = self.locations(embs).float()  # (N, L, d)
        fold = fold_of(n, folds)
        per_fold = max(1, -(-int(max_images) // int(folds)))
        d = x.shape[-1]
        eye = torch.eye(d, dtype=torch.float64, device=x.device)
        out = []
        for f in range(int(folds)):
            in_f = (fold == f).to(x.device)
            n_a = int(in_f.sum())
            n_b = n - n_a
            held = in_f.nonzero().flatten()[:per_fold]
            dist = x.new_empty(len(held), h * w)
            for lo in range(0, h * w, self.chunk):
                hi = min(h * w, lo + self.chunk)
                xa = x[in_f, lo:hi].transpose(0, 1)  # (Lc, n_a, d)
                mu_a = xa.mean(1)
                centred = xa - mu_a[:, None]
                mu_b = (n * mean[lo:hi] - n_a * mu_a) / n_b
                delta = mu_a - mu_b
                # M_b = M − M_a − (n_a n_b / n) δδᵀ, then Σ_b = M_b / (n_b − 1) + εI (in place: few temporaries)
                cov = torch.baddbmm(scatter[lo:hi], centred.transpose(1, 2), centred, alpha=-1.0)
                cov.baddbmm_(delta[:, :, None], delta[:, None, :], alpha=-(n_a * n_b / n))
                cov.div_(n_b - 1).diagonal(dim1=1, dim2=2).add_(self.epsilon)
                chol = torch.linalg.cholesky(cov)  # (x−μ)ᵀ Σ⁻¹ (x−μ) = ‖L⁻¹ (x−μ)‖²
                diff = (x[held, lo:hi] - mu_b).permute(1, 2, 0)  # (Lc, d, M)
                solved = torch.linalg.solve_triangular(chol, diff, upper=False)
                dist[:, lo:hi] = solved.pow(2).sum(1).clamp_min(0).sqrt().t().float()
            amap = resample(dist.view(len(held), h, w), grid, size)
            out.append(gaussian_blur2d(amap, self.blur_sigma))
        return torch.cat(out)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fitted:
            raise TexadError("PaDiM has no Gaussians: fit it first (or load a fitted checkpoint)")
        emb, grid = self.embedding(images)
        amap = resample(self.mahalanobis(emb), grid, tuple(images.shape[-2:]))
        amap = gaussian_blur2d(amap, self.blur_sigma)
        return amap, amap.flatten(1).amax(1)
