"""CFA and Sp-CFA as one pure torch model: a frozen backbone and one CFA head per view.

View "org" is the image itself; "small" and "big" are superpixel mosaics of it (Sp-CFA). CFA is the
special case with only the "org" view. Each view has its own descriptor, memory bank and loss; the
anomaly maps of the views are mapped back to image coordinates and fused with weights α.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from texad.backbones import FeatureExtractor, concat_layers, cropped_grid, padded_features
from texad.data.superpixels import inverse_mosaic
from texad.errors import TexadError
from texad.geometry import Grid, resample
from texad.methods.cfa.descriptor import CoordConvDescriptor
from texad.methods.cfa.loss import CoupledHypersphereLoss
from texad.methods.cfa.memory_bank import MemoryBank
from texad.methods.cfa.scorer import SCORERS
from texad.methods.components.fitted_state import FittedBuffers
from texad.methods.components.gaussian import gaussian_blur2d
from texad.methods.cfa.fusion import mosaic_blurred as blur_in_mosaic
from texad.methods.components.nearest import nearest_sq_distances

VIEWS = ("org", "small", "big")
#: none (official) | location: scores divided by their per-location level on training normals ("org" view
#: only: a mosaic's locations hold other image parts in every image)
CALIBRATIONS = ("none", "location")


class CFAHead(FittedBuffers):
    """Descriptor + memory bank + loss for one view."""

    fitted_buffers = ("location_scale",)

    def __init__(
        self, in_channels: int, gamma_d: int, k: int, j: int, r0: float, margin: float, nu: float, budget_mb: float,
        score: str = "softmin",
    ) -> None:
        super().__init__()
        if score not in SCORERS:
            raise TexadError(f"method.score must be one of {list(SCORERS)}, got {score!r}")
        self.scorer = SCORERS[score]
        self.descriptor = CoordConvDescriptor(in_channels, max(1, in_channels // gamma_d))
        self.bank = MemoryBank()
        self.loss_fn = CoupledHypersphereLoss(k=k, j=j, r0=r0, margin=margin, nu=nu)
        self.k, self.j, self.budget_mb = k, j, budget_mb
        # (h, w) per-location scale of the patch scores on the training normals (empty: none), see calibrate
        self.register_buffer("location_scale", torch.empty(0))

    def _patches(self, features: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        phi = self.descriptor(features)
        b, d, h, w = phi.shape
        return phi.permute(0, 2, 3, 1).reshape(-1, d), (b, h, w)

    def loss(self, features: torch.Tensor) -> torch.Tensor:
        patches, _ = self._patches(features)
        sq, _ = nearest_sq_distances(patches, self.bank.centroids, self.k + self.j, self.budget_mb)
        return self.loss_fn(sq)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(B,h,w) patch scores (`method.score`: softmin-weighted or plain nearest distance) at feature resolution."""
        patches, (b, h, w) = self._patches(features)
        sq, _ = nearest_sq_distances(patches, self.bank.centroids, self.k, self.budget_mb)
        scores = self.scorer(sq).view(b, h, w)
        if self.location_scale.numel() and self.location_scale.shape == (h, w):
            scores = scores / self.location_scale
        return scores

    @torch.no_grad()
    def calibrate(self, feature_batches) -> None:
        """Per-location score scale from normal training features: the mean score at each location
        over the images, divided by its mean over locations (so the scale of the map is kept).

        Why: with one centroid per location, a location whose features vary more from image to image
        (border cells, whose receptive field is half mirrored or zero padding, and corners above all)
        scores higher on every normal image; dividing by its own normal level removes that bias, for
        any cause. Scores of the images that built the bank are a little low everywhere alike.
        """
        self.location_scale = torch.empty(0, device=self.location_scale.device)
        total, n = None, 0
        for features in feature_batches:
            s = self.score(features)
            total = s.sum(0) if total is None else total + s.sum(0)
            n += s.shape[0]
        if total is None:
            return
        mean = total / n
        self.location_scale = (mean / mean.mean()).clamp_min(1e-6)


class CFAModel(nn.Module):
    """Images (and their superpixel mosaics) → per-view and fused anomaly maps at input size."""

    def __init__(
        self,
        backbone: FeatureExtractor,
        region_sizes: Sequence[int | None] = (None, None),
        alpha: Sequence[float] = (1.0, 0.0, 0.0),
        loss_weights: Sequence[float] = (1.0, 1.0, 1.0),
        k: int = 3,
        j: int = 3,
        r0: float = 1e-5,
        loss_margin: float = 0.1,
        nu: float = 1e-3,
        gamma_d: int = 1,
        pool: int = 3,
        blur_sigma: float = 4.0,
        distance_budget_mb: float = 256.0,
        init_seed: int | None = None,
        score: str = "softmin",
        input_padding: int = 0,
        input_padding_mode: str = "reflect",
        calibration: str = "none",
    ) -> None:
        super().__init__()
        if calibration not in CALIBRATIONS:
            raise TexadError(f"method.calibration must be one of {list(CALIBRATIONS)}, got {calibration!r}")
        self.calibration = calibration
        self.backbone = backbone
        self.pool, self.blur_sigma = pool, blur_sigma
        self.input_padding, self.input_padding_mode = int(input_padding), input_padding_mode
        self.region_sizes = {"small": region_sizes[0], "big": region_sizes[1]}
        self.view_names = ["org"] + [v for v in ("small", "big") if self.region_sizes[v] is not None]
        self.alpha = dict(zip(VIEWS, (float(a) for a in alpha)))
        self.loss_weights = dict(zip(VIEWS, (float(w) for w in loss_weights)))
        in_ch = sum(backbone.channels)

        def head() -> CFAHead:
            return CFAHead(in_ch, gamma_d, k, j, r0, loss_margin, nu, distance_budget_mb, score)

        self.heads = nn.ModuleDict({"org": head()})
        for v in self.view_names[1:]:
            self.heads[v] = self._seeded(head, init_seed, self.region_sizes[v])

    @staticmethod
    def _seeded(make: Callable[[], nn.Module], seed: int | None, region_size: int) -> nn.Module:
        """A superpixel head initialised from (seed, region size) alone, not from the global RNG.

        So a view's initial weights do not depend on which other views exist (a trained view can be
        cached and reused by any run with that region size), and the global RNG after building the
        model is the one CFA alone leaves: the "org" view is unchanged when views are added.
        """
        if seed is None:
            return make()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) * 1_000_003 + int(region_size))
            return make()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen, locally averaged features; the input is padded first (`method.input_padding`) and the
        maps cropped back, so border cells are not made unique by the backbone's zero padding."""
        def extract(x: torch.Tensor) -> tuple[list[torch.Tensor], list[Grid]]:
            # pooled and resampled before the crop: the 3×3 average of a border cell then covers
            # padded context, not avg_pool2d's zero padding
            maps = self.backbone(x)
            cat, grid = concat_layers(maps, self.backbone.grids(x.shape[-2:], maps), self.pool)
            return [cat], [grid]

        return padded_features(extract, images, self.input_padding, self.input_padding_mode)[0][0]

    def feature_grid(self, image_hw: tuple[int, int], feature_hw: tuple[int, int]) -> Grid:
        """Where the cells of `features` of an image of `image_hw` sit in it."""
        return cropped_grid(self.backbone, image_hw, feature_hw, self.input_padding)

    def view_features(
        self, images: torch.Tensor, mosaics: dict[str, torch.Tensor], views: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Frozen features of the active views (or of `views` only); mosaics maps view name → (B,3,H,W)."""
        wanted = self.view_names if views is None else [v for v in self.view_names if v in views]
        return {v: self.features(images if v == "org" else mosaics[v]) for v in wanted}

    def loss(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Σ w_v L_v over the views present in `feats` (frozen, cached views are left out)."""
        views = [v for v in self.view_names if v in feats]
        parts = {v: self.heads[v].loss(feats[v]) for v in views}
        return sum(self.loss_weights[v] * parts[v] for v in views), parts

    def view_maps(
        self,
        feats: dict[str, torch.Tensor],
        size: tuple[int, int],
        superpixels: torch.Tensor | None = None,
        mosaic_blurred: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Unsmoothed per-view maps (B,H,W) in image coordinates (mosaic views mapped back).

        Only the views present in `feats` are computed; `superpixels` levels follow `view_names[1:]`.
        A dict passed as `mosaic_blurred` receives, for each superpixel view, its map blurred in
        mosaic coordinates and then mapped back (the paper's order, `fusion.BLUR_ORDERS`).
        """
        maps = {}
        for i, v in enumerate(self.view_names):
            if v not in feats:
                continue
            s = self.heads[v].score(feats[v])
            s = resample(s, self.feature_grid(size, tuple(s.shape[-2:])), size)
            if v != "org":
                if mosaic_blurred is not None:
                    mosaic_blurred[v] = blur_in_mosaic(s, superpixels[:, i - 1], self.blur_sigma)
                s = inverse_mosaic(s, superpixels[:, i - 1])
            maps[v] = s
        return maps

    def fuse(self, maps: dict[str, torch.Tensor], alpha: dict[str, float] | None = None) -> torch.Tensor:
        """α-weighted sum of the per-view maps, then the Gaussian blur (linear, so order is free)."""
        alpha = alpha or self.alpha
        fused = sum(alpha.get(v, 0.0) * m for v, m in maps.items())
        return gaussian_blur2d(fused, self.blur_sigma)

    @property
    def views_without_bank(self) -> list[str]:
        return [v for v in self.view_names if not self.heads[v].bank.is_built]

    def build_bank_step(self, feats: dict[str, torch.Tensor]) -> None:
        """Accumulate features of the views in `feats` whose bank is not built yet (cached ones are)."""
        for v in self.views_without_bank:
            if v in feats:
                self.heads[v].bank.accumulate(feats[v])

    def finalize_banks(self, gamma_c: int, seed: int) -> None:
        for v in self.views_without_bank:
            self.heads[v].bank.finalize(self.heads[v].descriptor, gamma_c, seed)

    @property
    def banks_built(self) -> bool:
        return all(self.heads[v].bank.is_built for v in self.view_names)
