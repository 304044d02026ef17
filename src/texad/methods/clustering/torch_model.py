"""Anomaly clustering parts: map-weighted image descriptors, pair mining, the head and its loss.

Follows the official BlindLCA code (see ``shared/reference/fca-blind.md`` §4) on *how*:

* **Descriptor** D_i = Σ_x softmax(α_i/τ)(x) · F̃_i(x), F̃ = features blurred (kernel 7, σ 2) minus
  each channel's spatial mean. The official code applies τ = 0.002 to α on its own, unstated scale;
  here α is first min–max normalised **across the clustered data set** (`normalise_maps`), so τ is a
  fraction of the data set's map range and means the same for FCA maps, masks and stored maps.
* **Pairs** come from the descriptors before the head: each image's k nearest images are its
  positives; its negatives are drawn from the images in the bottom ``negative_quantile`` of its
  similarities (the official code: the least similar half, 5 drawn per step).
* **Head**: per-location 1×1-conv MLP (C→hidden→out), L2-normalised per location.
* **Loss** (Hadsell et al. 2006 in the official code's form): squared distances between *pixel*
  embeddings; attract anomalous–anomalous and normal–normal pixels of an anchor and its positives,
  repel with relu(margin − d²) anchor-anomalous vs normal pixels and anomalous pixels of the
  positives vs those of the negatives.

Deliberate difference: the official code splits anomalous from normal pixels with one global
threshold found by k-means with a "good" cluster, which needs normal images in the clustered set.
We cluster anomalous images only, so every image holds a defect and the split is per image
(`split_pixels`): anomalous = α above median + level·(max − median), normal = α at or below the
median.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from texad.backbones import local_average_and_concat
from texad.errors import TexadError
from texad.methods.fca.torch_model import gaussian_kernel_1d

__all__ = [
    "normalise_maps",
    "attention_weights",
    "smooth_and_center",
    "weighted_descriptors",
    "mine_pairs",
    "split_pixels",
    "ProjectionHead",
    "contrastive_loss",
    "ward_clusters",
    "ClusteringModel",
]


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min–max over the whole set (N, h, w) → [0, 1]: one scale for every image, so τ means the same."""
    low, high = maps.min(), maps.max()
    if float(high - low) <= 0:
        return torch.zeros_like(maps)
    return (maps - low) / (high - low)


def attention_weights(maps: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(α/τ) over the locations of each map: (N, h, w) → (N, h, w), each summing to 1."""
    if temperature <= 0:
        raise TexadError(f"method.temperature must be positive, got {temperature}")
    n = maps.shape[0]
    return torch.softmax(maps.reshape(n, -1).double() / temperature, dim=1).reshape(maps.shape).to(maps.dtype)


def smooth_and_center(features: torch.Tensor, kernel: int = 7, sigma: float = 2.0) -> torch.Tensor:
    """F̃: Gaussian blur (reflect padding) then subtract each channel's spatial mean.

    The blur gathers a defect's context into the few locations the attention picks; removing the
    mean keeps the texture's average appearance, shared by all images, out of the descriptor.
    """
    if kernel and kernel > 1:
        c, (h, w), r = features.shape[1], features.shape[-2:], kernel // 2
        k1 = gaussian_kernel_1d(kernel, sigma, dtype=features.dtype).to(features.device)
        x = F.pad(features, (r, r, r, r), mode="reflect" if r < min(h, w) else "replicate")
        x = F.conv2d(x, k1.view(1, 1, 1, -1).expand(c, 1, 1, kernel), groups=c)
        features = F.conv2d(x, k1.view(1, 1, -1, 1).expand(c, 1, kernel, 1), groups=c)
    return features - features.mean(dim=(-2, -1), keepdim=True)


def weighted_descriptors(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_x w(x)·F̃(x): (N, C, h, w) features and (N, h, w) weights → (N, C)."""
    if features.shape[0] != weights.shape[0] or features.shape[-2:] != weights.shape[-2:]:
        raise TexadError(f"features {tuple(features.shape)} and weights {tuple(weights.shape)} do not match")
    return torch.einsum("nchw,nhw->nc", features, weights.to(features.dtype))


def mine_pairs(descriptors: torch.Tensor, k: int, negative_quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives (N, k): each image's k nearest others; negatives (N, N) bool: candidates per anchor.

    Similarity is minus the Euclidean distance (the official 1 − 100·mean squared difference ranks
    the same). An anchor's negative candidates are the others whose similarity is at or below the
    ``negative_quantile`` quantile of its similarities to the others (at least the least similar one).
    """
    n = descriptors.shape[0]
    if n < k + 1:
        raise TexadError(f"method.k={k} needs at least k+1={k + 1} images to cluster, got {n}")
    if not 0.0 < negative_quantile <= 1.0:
        raise TexadError(f"method.negative_quantile must be in (0, 1], got {negative_quantile}")
    distance = torch.cdist(descriptors.double(), descriptors.double())
    distance.fill_diagonal_(float("inf"))
    positives = distance.topk(k, dim=1, largest=False).indices
    similarity = -distance
    eye = torch.eye(n, dtype=torch.bool, device=descriptors.device)
    others = similarity.masked_select(~eye).view(n, n - 1)
    cut = torch.quantile(others, negative_quantile, dim=1, keepdim=True)
    negatives = (similarity <= cut) & ~eye
    return positives, negatives


def split_pixels(maps: torch.Tensor, level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (N, h, w): anomalous = α > median + level·(max − median) (and the max itself),
    normal = α ≤ median. Per image because every clustered image holds a defect."""
    flat = maps.reshape(maps.shape[0], -1)
    median = flat.median(dim=1, keepdim=True).values
    top = flat.max(dim=1, keepdim=True).values
    anomalous = (flat > median + level * (top - median)) | (flat >= top)
    normal = flat <= median
    return anomalous.view_as(maps), normal.view_as(maps)


class ProjectionHead(nn.Module):
    """Per-location MLP as 1×1 convolutions, output L2-normalised per location (BlindLCA's head)."""

    def __init__(self, in_channels: int, hidden_channels: int = 256, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden_channels, out_channels, 1)
        )
        self.out_channels = out_channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) → (N, out, h, w); (P, C) pixel vectors → (P, out)."""
        if features.dim() == 2:
            return F.normalize(self.net(features[:, :, None, None])[:, :, 0, 0], dim=1)
        return F.normalize(self.net(features), dim=1)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)


def contrastive_loss(
    anchor_anomalous: torch.Tensor,
    anchor_normal: torch.Tensor,
    close_anomalous: torch.Tensor,
    close_normal: torch.Tensor,
    negative_anomalous: torch.Tensor,
    margin: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hadsell-style loss on pixel embeddings (all (P, D), unit length), as the official code.

    Attraction: mean d² between anchor and close (anchor + positives) anomalous pixels, and between
    their normal pixels. Repulsion: mean relu(margin − d²) between anchor anomalous and close normal
    pixels, and between close anomalous and negative anomalous pixels.
    """
    parts = {
        "attract_anomalous": _squared_distances(anchor_anomalous, close_anomalous).mean(),
        "attract_normal": _squared_distances(anchor_normal, close_normal).mean(),
        "repel_normal": F.relu(margin - _squared_distances(anchor_anomalous, close_normal)).mean(),
        "repel_negative": F.relu(margin - _squared_distances(close_anomalous, negative_anomalous)).mean(),
    }
    return sum(parts.values()), parts


def ward_clusters(descriptors: torch.Tensor, n_clusters: int) -> np.ndarray:
    """Ward agglomerative clustering (scikit-learn) of (N, D) descriptors into n_clusters ids."""
    from sklearn.cluster import AgglomerativeClustering

    n = descriptors.shape[0]
    if not 1 <= n_clusters <= n:
        raise TexadError(f"method.n_clusters={n_clusters} must be between 1 and the number of clustered images ({n})")
    if n_clusters == 1 or n == 1:
        return np.zeros(n, dtype=np.int64)
    x = descriptors.detach().double().cpu().numpy()
    return AgglomerativeClustering(n_clusters=n_clusters, linkage="ward").fit_predict(x).astype(np.int64)


class ClusteringModel(nn.Module):
    """Frozen backbone, FCA (zero-shot maps) and the trainable head, in one module for checkpoints.

    `features` is what both the descriptors and the head see: every backbone layer upsampled
    (bilinear) to the first layer's resolution, concatenated, and min–max scaled per image and
    channel (the official code scales the features the head and FCA see the same way).
    `fca_layers` picks the channels FCA sees (indices into the backbone's layers): on the embedded
    gravel set FCA on efficientnet_lite0's first layer (stride 4) gave pixel AUROC 0.77, on all three
    layers 0.53, on the stride-8 layer alone 0.46 (10 images, 256²).
    """

    def __init__(self, backbone: nn.Module, hidden_channels: int = 256, out_channels: int | None = None,
                 fca: dict | None = None, fca_layers: tuple[int, ...] = (0,)) -> None:
        super().__init__()
        from texad.methods.fca.torch_model import FCA

        self.backbone = backbone
        bad = [i for i in fca_layers if not 0 <= int(i) < len(backbone.channels)]
        if bad or not fca_layers:
            raise TexadError(f"method.fca_layers={list(fca_layers)} must pick among the backbone's "
                             f"{len(backbone.channels)} layers (0..{len(backbone.channels) - 1})")
        bounds = np.cumsum([0, *backbone.channels])
        self.fca_channels = [c for i in fca_layers for c in range(int(bounds[i]), int(bounds[i + 1]))]
        self.in_channels = int(sum(backbone.channels))
        self.head = ProjectionHead(self.in_channels, hidden_channels, out_channels)
        self.fca = FCA(**(fca or {}))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        from texad.methods.fca.torch_model import scale_features_minmax

        return scale_features_minmax(local_average_and_concat(self.backbone(images), pool=1))

    def head_features(self, features: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """The head on whole feature maps, a few images at a time."""
        return torch.cat([self.head(features[i:i + chunk]) for i in range(0, features.shape[0], chunk)])
