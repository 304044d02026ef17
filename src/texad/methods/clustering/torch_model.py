"""Anomaly clustering parts: map-weighted image descriptors, pair mining, the head and its loss.

Follows the official BlindLCA code (TArdelean/BlindLCA; README.md beside this file) on *how*:

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

Options (``conf/method/clustering.yaml``): ``attention_border`` (a frame left out of the attention,
``clear_border``), ``center`` (subtract each image's own channel mean or the normal images' mean
feature), ``standardize`` (divide by the normal images' per-channel spread), ``pooling`` (softmax(α/τ)
as the paper, or a uniform average over the anomalous pixels), ``mutual`` nearest-neighbour positives,
the descriptor's backbone layers and local pooling, and L2-normalised descriptors before Ward. τ, the
layers, the mining, the negatives and the epochs are chosen per run on typed validation defects
(``validation_choice.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import AgglomerativeClustering
from torch import nn

from texad.backbones import concat_layers
from texad.data.datamodule import EpochSeededShuffle
from texad.errors import TexadError
from texad.geometry import PIXELS, Grid, resample
from texad.methods.components.feature_maps import scale_features_minmax
from texad.methods.components.gaussian import gaussian_taps

__all__ = [
    "maps_on_cells",
    "normalise_maps",
    "clear_border",
    "attention_weights",
    "smooth_and_center",
    "weighted_descriptors",
    "threshold_weights",
    "mine_pairs",
    "split_pixels",
    "ProjectionHead",
    "contrastive_loss",
    "ward_clusters",
    "ClusteringModel",
    "image_descriptors",
    "anchor_generator",
    "train_head",
]


def maps_on_cells(maps: torch.Tensor, grid: Grid, size: tuple[int, int]) -> torch.Tensor:
    """Pixel maps (N, H, W) → the mean over each feature cell's extent (N, h, w) at its true place
    (a mask becomes each cell's coverage)."""
    return resample(maps, PIXELS, size, grid, mode="area")


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min–max over the whole set (N, h, w) → [0, 1]: one scale for every image, so τ means the same."""
    low, high = maps.min(), maps.max()
    if float(high - low) <= 0:
        return torch.zeros_like(maps)
    return (maps - low) / (high - low)


def clear_border(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Set a frame of round(fraction · side) cells of every (N, h, w) map to that map's minimum.

    Localisers score the image border high on normal texture (padding effects), and softmax(α/τ)
    then attends to a corner instead of the defect. The official blind pipeline zeroes a 5-cell frame
    of its 64² maps (5/64 ≈ 0.08) for the same reason; here it is applied to any map source.
    """
    if fraction <= 0:
        return maps
    if fraction >= 0.5:
        raise TexadError(f"method.attention_border must be in [0, 0.5), got {fraction}")
    h, w = maps.shape[-2:]
    by, bx = int(round(fraction * h)), int(round(fraction * w))
    if by == 0 and bx == 0:
        return maps
    low = maps.flatten(1).amin(1).view(-1, 1, 1).expand_as(maps)
    frame = torch.ones(h, w, dtype=torch.bool, device=maps.device)
    frame[by:h - by, bx:w - bx] = False
    return torch.where(frame, low, maps)


def attention_weights(maps: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(α/τ) over the locations of each map: (N, h, w) → (N, h, w), each summing to 1."""
    if temperature <= 0:
        raise TexadError(f"method.temperature must be positive, got {temperature}")
    n = maps.shape[0]
    return torch.softmax(maps.reshape(n, -1).double() / temperature, dim=1).reshape(maps.shape).to(maps.dtype)


CENTERS = ("image", "normal", "none")
POOLINGS = ("softmax", "threshold")


def smooth_and_center(features: torch.Tensor, kernel: int = 7, sigma: float = 2.0, center: str = "image",
                      normal_mean: torch.Tensor | None = None, normal_std: torch.Tensor | None = None) -> torch.Tensor:
    """F̃: Gaussian blur (reflect padding), subtract a mean feature, optionally divide by a normal std.

    The blur gathers a defect's context into the few locations the attention picks. ``center``:
    ``image`` subtracts each image's own channel means (the official code: the texture's average
    appearance, shared by all images, stays out of the descriptor), ``normal`` subtracts the mean
    feature vector of the normal images (``normal_mean``, (C,)): the descriptor then keeps how the
    whole image differs from normal. With weights summing to one both only shift descriptors (Ward
    on Euclidean distances does not change under a common shift), so they matter through the
    image-specific part and through L2 normalisation. ``normal_std`` ((C,), optional) divides every
    channel by its spread on normal images, so channels that vary a lot on normal texture weigh less.
    """
    if center not in CENTERS:
        raise TexadError(f"method.center must be one of {list(CENTERS)}, got {center!r}")
    if kernel and kernel > 1:
        c, (h, w), r = features.shape[1], features.shape[-2:], kernel // 2
        k1 = gaussian_taps(kernel, sigma, dtype=features.dtype).to(features.device)
        x = F.pad(features, (r, r, r, r), mode="reflect" if r < min(h, w) else "replicate")
        x = F.conv2d(x, k1.view(1, 1, 1, -1).expand(c, 1, 1, kernel), groups=c)
        features = F.conv2d(x, k1.view(1, 1, -1, 1).expand(c, 1, kernel, 1), groups=c)
    if center == "image":
        features = features - features.mean(dim=(-2, -1), keepdim=True)
    elif center == "normal":
        if normal_mean is None:
            raise TexadError("method.center='normal' needs the normal images' mean feature (none was computed)")
        features = features - normal_mean.to(features).view(1, -1, 1, 1)
    if normal_std is not None:
        features = features / normal_std.to(features).clamp(min=1e-6).view(1, -1, 1, 1)
    return features


def threshold_weights(maps: torch.Tensor, level: float) -> torch.Tensor:
    """Uniform weights over each image's anomalous pixels (``split_pixels``): (N, h, w), rows sum to 1."""
    anomalous, _ = split_pixels(maps, level)
    w = anomalous.to(maps.dtype)
    return w / w.flatten(1).sum(1).clamp(min=1).view(-1, 1, 1)


def weighted_descriptors(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_x w(x)·F̃(x): (N, C, h, w) features and (N, h, w) weights → (N, C)."""
    if features.shape[0] != weights.shape[0] or features.shape[-2:] != weights.shape[-2:]:
        raise TexadError(f"features {tuple(features.shape)} and weights {tuple(weights.shape)} do not match")
    return torch.einsum("nchw,nhw->nc", features, weights.to(features.dtype))


def mine_pairs(descriptors: torch.Tensor, k: int, negative_quantile: float,
               mutual: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Positives (one index tensor per image) and negatives (N, N) bool: candidates per anchor.

    Positives: each image's k nearest others; with ``mutual`` only those j that also have i among
    their k nearest (mutual nearest neighbours, fewer but purer pairs), falling back to the single
    nearest one when none is mutual. Similarity is minus the Euclidean distance (the official
    1 − 100·mean squared difference ranks the same). An anchor's negative candidates are the others
    whose similarity is at or below the ``negative_quantile`` quantile of its similarities to the
    others (at least the least similar one).
    """
    n = descriptors.shape[0]
    if n < k + 1:
        raise TexadError(f"method.k={k} needs at least k+1={k + 1} images to cluster, got {n}")
    if not 0.0 < negative_quantile <= 1.0:
        raise TexadError(f"method.negative_quantile must be in (0, 1], got {negative_quantile}")
    distance = torch.cdist(descriptors.double(), descriptors.double())
    distance.fill_diagonal_(float("inf"))
    knn = distance.topk(k, dim=1, largest=False).indices
    if mutual:
        member = torch.zeros(n, n, dtype=torch.bool, device=descriptors.device)
        member[torch.arange(n)[:, None], knn] = True
        both = member & member.T
        positives = [row[both[i, row]] if both[i, row].any() else row[:1] for i, row in enumerate(knn)]
    else:
        positives = list(knn)
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
    n = descriptors.shape[0]
    if not 1 <= n_clusters <= n:
        raise TexadError(f"method.n_clusters={n_clusters} must be between 1 and the number of clustered images ({n})")
    if n_clusters == 1 or n == 1:
        return np.zeros(n, dtype=np.int64)
    x = descriptors.detach().double().cpu().numpy()
    return AgglomerativeClustering(n_clusters=n_clusters, linkage="ward").fit_predict(x).astype(np.int64)


class ClusteringModel(nn.Module):
    """Frozen backbone, the trainable head and (when maps are computed in the run) the localiser.

    `features` is what both the descriptors and the head see: every backbone layer, each locally
    averaged ``feature_pool``×``feature_pool`` (1 = off), resampled onto the finest layer's cells,
    concatenated, and min–max scaled per image and channel (the official code scales the features
    the head sees the same way). A descriptor reads the channels of some layers (`channels`): the
    head those of ``head_layers`` (``descriptor_layers``, or what validation chose), the raw
    descriptors their own; scaling is per channel, so a subset of the concatenation equals the
    concatenation of the subset. ``normal_pixels`` is a fixed random sample of normal images'
    feature vectors (filled at fit start when the options need normal statistics): their mean and
    spread give the ``center="normal"`` / ``standardize`` statistics, also after the head.
    ``localizer`` is another texad method (FCA, blind VAE, CFA) whose ``predict_maps`` gives the maps.
    """

    def __init__(self, backbone: nn.Module, hidden_channels: int = 256, out_channels: int | None = None,
                 descriptor_layers: tuple[int, ...] | None = None, feature_pool: int = 1,
                 normal_pixels: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        if int(feature_pool) < 1:
            raise TexadError(f"method.feature_pool must be at least 1, got {feature_pool}")
        self.feature_pool = int(feature_pool)
        self.hidden_channels, self.out_channels = int(hidden_channels), out_channels
        bounds = np.cumsum([0, *backbone.channels])
        self._layer_slices = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        self.head_layers = self.layers(descriptor_layers)
        self.head = ProjectionHead(len(self.channels(self.head_layers)), hidden_channels, out_channels)
        self.register_buffer("normal_pixels", torch.zeros(int(normal_pixels), int(bounds[-1])))
        self.localizer: nn.Module | None = None

    def layers(self, layers: Sequence[int] | None) -> tuple[int, ...]:
        """Checked, sorted backbone layer indices (None = all)."""
        n = len(self._layer_slices)
        chosen = tuple(range(n)) if layers is None else tuple(int(i) for i in layers)
        if not chosen or any(not 0 <= i < n for i in chosen):
            raise TexadError(f"method.descriptor_layers={list(chosen)} must pick among the backbone's "
                             f"{n} layers (0..{n - 1}, null = all)")
        return tuple(sorted(set(chosen)))

    def channels(self, layers: Sequence[int] | None) -> torch.Tensor:
        """Indices of the feature channels of these layers in `features`' concatenation."""
        return torch.cat([torch.arange(*self._layer_slices[i]) for i in self.layers(layers)])

    def set_head_layers(self, layers: Sequence[int] | None) -> None:
        """A fresh head reading these layers (after validation chose them)."""
        self.head_layers = self.layers(layers)
        device = next(self.head.parameters()).device
        self.head = ProjectionHead(len(self.channels(self.head_layers)), self.hidden_channels,
                                   self.out_channels).to(device)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """Min–max scaled features of every layer (N, C, h, w) on the finest layer's cells, and their grid."""
        maps = self.backbone(images)
        grids = self.backbone.grids(images.shape[-2:], maps)
        cat, grid = concat_layers(list(maps), list(grids), self.feature_pool)
        return scale_features_minmax(cat), grid

    def normal_sample(self, layers: Sequence[int] | None) -> torch.Tensor | None:
        """The normal pixel sample's channels of these layers (P, C'); None if not sampled."""
        if self.normal_pixels.shape[0] == 0 or not bool(self.normal_pixels.abs().sum() > 0):
            return None
        return self.normal_pixels[:, self.channels(layers).to(self.normal_pixels.device)]


def image_descriptors(features: torch.Tensor, maps: torch.Tensor, temperature: float, *, head: nn.Module | None = None,
                      normal_pixels: torch.Tensor | None = None, pooling: str = "softmax", anomalous_level: float = 0.5,
                      center: str = "image", standardize: bool = False, normalize: bool = False, blur_kernel: int = 7,
                      blur_sigma: float = 2.0, chunk: int = 8) -> torch.Tensor:
    """(N, C) descriptors of features (N, C, h, w) attended by maps (N, h, w), through ``head`` if given.

    ``normal_pixels`` (P, C), the normal sample of the same channels, is needed for ``center="normal"``
    and ``standardize``; its statistics are taken after the head when there is one.
    """
    weights = normalise_maps(maps)
    weights = (attention_weights(weights, temperature) if pooling == "softmax"
               else threshold_weights(weights, anomalous_level))
    if head is not None:
        features = torch.cat([head(features[i:i + chunk]) for i in range(0, features.shape[0], chunk)])
    mean = std = None
    if center == "normal" or standardize:
        if normal_pixels is None:
            raise TexadError("method.center=normal / method.standardize need normal images' features (none sampled)")
        sample = head(normal_pixels) if head is not None else normal_pixels
        mean, std = sample.mean(0), sample.std(0)
    smooth = smooth_and_center(features, blur_kernel, blur_sigma, center, mean if center == "normal" else None,
                               std if standardize else None)
    out = weighted_descriptors(smooth, weights)
    return F.normalize(out, dim=1) if normalize else out


# --- the head's training data and loss per anchor (used by the LightningModule and the study) ----
def _index_lists(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) bool → padded flat indices (N, max count) and counts (N,), for vectorised sampling."""
    lengths = masks.sum(1)
    padded = torch.zeros(masks.shape[0], max(int(lengths.max()), 1), dtype=torch.long)
    for i, row in enumerate(masks):
        idx = row.nonzero()[:, 0]
        padded[i, : len(idx)] = idx
    return padded, lengths.clamp(min=1)


def pair_training_data(features: torch.Tensor, maps: torch.Tensor, positives: list[torch.Tensor],
                       negatives: torch.Tensor, anomalous_level: float) -> dict:
    """What `anchor_loss` draws from: features (N, C, hw), pairs, and per image its anomalous and
    normal pixel indices (``split_pixels`` of the set-normalised maps)."""
    anomalous, normal = split_pixels(normalise_maps(maps), anomalous_level)
    return {
        "features": features.flatten(2),
        "positives": positives,
        "negatives": negatives,
        "anomalous": _index_lists(anomalous.flatten(1)),
        "normal": _index_lists(normal.flatten(1)),
    }


def _sample_pixels(data: dict, images: torch.Tensor, kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    """n feature vectors (n, C) of `kind` pixels, each from an image drawn uniformly from `images`."""
    padded, lengths = data[kind]
    img = images[torch.randint(len(images), (n,), generator=g)]
    pos = (torch.rand(n, generator=g) * lengths[img]).long()
    return data["features"][img, :, padded[img, pos]]


def anchor_loss(head: nn.Module, data: dict, anchor: int, g: torch.Generator, n_negatives: int,
                anchor_pixels: int, pair_pixels: int, margin: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The official per-anchor step: anchor and positives' pixels attract, negatives' repel."""
    first = torch.tensor([anchor])
    close = torch.cat([first, data["positives"][anchor].cpu()])
    pool = data["negatives"][anchor].nonzero()[:, 0].cpu()
    negatives = pool[torch.randperm(len(pool), generator=g)[:n_negatives]]
    vectors = [
        _sample_pixels(data, first, "anomalous", anchor_pixels, g),
        _sample_pixels(data, first, "normal", anchor_pixels, g),
        _sample_pixels(data, close, "anomalous", pair_pixels, g),
        _sample_pixels(data, close, "normal", pair_pixels, g),
        _sample_pixels(data, negatives, "anomalous", pair_pixels, g),
    ]
    sizes = [len(v) for v in vectors]
    embedded = head(torch.cat(vectors).to(device)).split(sizes)
    loss, _ = contrastive_loss(*embedded, margin=margin)
    return loss


def anchor_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one training step's pixel and negative draws (the fit and ``train_head`` alike)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def train_head(head: nn.Module, data: dict, epochs: int, seed: int, *, n_negatives: int = 5, anchor_pixels: int = 20,
               pair_pixels: int = 50, margin: float = 0.5, lr: float = 5e-4, weight_decay: float = 0.01,
               after_epoch: Callable[[int], None] | None = None) -> list[float]:
    """The head's training outside a Lightning trainer (validation studies): AdamW, one anchor per step,
    anchors in a seeded order per epoch, as the method's fit. ``after_epoch(e)`` is called after epoch
    e (1-based), e.g. to score the head there. Returns the mean loss of every epoch."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    n, step, losses = data["features"].shape[0], 0, []
    order = EpochSeededShuffle(n, seed)  # the fit's anchor order
    for epoch in range(int(epochs)):
        head.train()
        order.set_epoch(epoch)
        total = 0.0
        for anchor in order:
            g = anchor_generator(seed, step)
            loss = anchor_loss(head, data, anchor, g, n_negatives, anchor_pixels, pair_pixels, margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            step += 1
        losses.append(total / max(n, 1))
        head.eval()
        if after_epoch is not None:
            with torch.no_grad():
                after_epoch(epoch + 1)
    return losses
