"""Image scores calibrated on maps of held-out normal images, and the rule chosen on validation.

Why: a map's maximum mixes how anomalous a place is with how noisy the map is on that texture. A few
per-map statistics, compared with their spread over maps of normal images the model was *not* fitted
on, separate the two. Follows StructCore's idea (a diagonal Mahalanobis distance over a handful of map
statistics fitted on normal maps); deviations: the statistics are texad's own choice (below), they are
fitted on held-out normals (k-fold banks for memory-bank methods, cross-fitted validation normals for
the others) instead of training normals scored against a bank that holds them, and a one-sided
variant (`calibrated_upper`: only statistics *above* their normal level count) is offered beside the
two-sided distance, because held-out normals score a little higher than test normals scored against
the full bank, and a two-sided distance would call an unusually clean test image anomalous.

Statistics of a map m (H, W), `STATISTICS` in order:
  max, top_mean (mean of the top 1 %), mean, std (population), tv (mean |∂x| + |∂y|),
  zmax (max over pixels of (m − μ_px) / σ_px, with μ_px, σ_px the per-pixel mean / std of the fit maps;
  for a fit map itself, of the other fit maps).
Calibrated score = sqrt(Σ_j z_j²), z_j = (s_j − μ_j) / σ_j over the fit maps' statistics
(`calibrated_upper`: z_j clipped below at 0).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from texad.errors import TexadError
from texad.methods.components.fitted_state import FittedBuffers
from texad.methods.components.image_score import image_score

__all__ = ["RULES", "STATISTICS", "TOP_FRACTION", "ImageScorer", "choose_rule", "fold_of", "fold_splits",
           "map_statistics"]

#: candidate image-score rules, simplest first (ties on validation go to the earlier one). `official`
#: is the method's own pred_score (main's behaviour: PatchCore's patch maximum, CFA's top_mean, ...).
RULES = ("official", "max", "top_mean", "calibrated", "calibrated_upper")
CALIBRATED = ("calibrated", "calibrated_upper")
STATISTICS = ("max", "top_mean", "mean", "std", "tv", "zmax")
TOP_FRACTION = 0.01
SOURCES = ("none", "train_kfold", "validation")
EPS = 1e-8


def fold_of(n_images: int, folds: int) -> torch.Tensor:
    """Fold index of each image (image i → i mod folds): every fold holds images from the whole set."""
    if int(folds) < 2:
        raise TexadError(f"method.calibration_folds must be >= 2, got {folds}")
    if n_images < int(folds):
        raise TexadError(f"calibration needs at least {folds} training images for {folds} folds, got {n_images}")
    return torch.arange(n_images) % int(folds)


def fold_splits(origin: torch.Tensor, n_images: int, folds: int, max_images: int | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each fold: (held-out image indices, boolean mask of bank entries that may stay).

    `origin` (M,) is the training image each bank entry came from; an entry stays in fold f's bank
    only if its image is not in fold f, so no held-out image is scored against its own patches.
    `max_images` caps how many held-out images are scored in all (spread evenly over the folds).
    """
    fold = fold_of(n_images, folds)
    per_fold = None if max_images is None else max(1, -(-int(max_images) // int(folds)))
    for f in range(int(folds)):
        held = (fold == f).nonzero().flatten()
        if per_fold is not None:
            held = held[:per_fold]
        yield held, fold[origin.cpu()] != f


def map_statistics(maps: torch.Tensor, pixel_mean: torch.Tensor | None = None,
                   pixel_std: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, W) maps → (B, len(STATISTICS)) float64 statistics (zmax = max without the per-pixel
    normalisation when no pixel statistics are given)."""
    m = maps.detach().double()
    flat = m.flatten(1)
    tv = (m[:, 1:, :] - m[:, :-1, :]).abs().flatten(1).mean(1) if m.shape[1] > 1 else flat.new_zeros(len(m))
    if m.shape[2] > 1:
        tv = tv + (m[:, :, 1:] - m[:, :, :-1]).abs().flatten(1).mean(1)
    if pixel_mean is None:
        zmax = flat.amax(1)
    else:
        if tuple(pixel_mean.shape) != tuple(m.shape[1:]):
            raise TexadError(f"image score calibration was fitted on {tuple(pixel_mean.shape)} maps, got "
                             f"{tuple(m.shape[1:])} maps: evaluate at the training image size")
        zmax = ((m - pixel_mean.to(m)) / pixel_std.to(m)).flatten(1).amax(1)
    return torch.stack([flat.amax(1), image_score(m, "top_mean", TOP_FRACTION), flat.mean(1),
                        flat.std(1, unbiased=False), tv, zmax], 1)


class ImageScorer(FittedBuffers):
    """The image-score rule of a run and the calibration its calibrated rules need (all in checkpoints).

    `fit(maps, source)` takes maps of held-out normal images; `scores(maps, official)` gives every rule's
    scores; `rule` is the index in RULES chosen on validation (or fixed by the method's `image_rule`).
    """

    fitted_buffers = ("stat_mean", "stat_std", "pixel_mean", "pixel_std")

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("stat_mean", torch.empty(0, dtype=torch.float64))
        self.register_buffer("stat_std", torch.empty(0, dtype=torch.float64))
        self.register_buffer("pixel_mean", torch.empty(0, dtype=torch.float64))
        self.register_buffer("pixel_std", torch.empty(0, dtype=torch.float64))
        self.register_buffer("rule", torch.zeros((), dtype=torch.long))  # index in RULES; 0 = official
        self.register_buffer("source", torch.zeros((), dtype=torch.long))  # index in SOURCES
        self.register_buffer("n_fit", torch.zeros((), dtype=torch.long))  # maps the calibration saw

    @property
    def fitted(self) -> bool:
        return self.stat_mean.numel() > 0

    @property
    def rule_name(self) -> str:
        return RULES[int(self.rule)]

    @property
    def source_name(self) -> str:
        return SOURCES[int(self.source)]

    def set_rule(self, name: str) -> None:
        if name not in RULES:
            raise TexadError(f"method.image_rule must be 'auto' or one of {list(RULES)}, got {name!r}")
        self.rule.fill_(RULES.index(name))

    @staticmethod
    def calibration_of(maps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-pixel and per-statistic mean / std of normal maps (B, H, W), B >= 2."""
        if maps.ndim != 3 or maps.shape[0] < 2:
            raise TexadError(f"image score calibration needs at least 2 normal maps (B, H, W), got {tuple(maps.shape)}")
        m = maps.detach().double().cpu()
        n = m.shape[0]
        pixel_mean, pixel_std = m.mean(0), m.std(0, unbiased=False)
        floor = EPS * max(1.0, float(pixel_std.max()))
        pixel_std = pixel_std.clamp_min(floor)
        # each fit map's zmax uses the per-pixel statistics of the *other* fit maps (leave-one-out, in
        # closed form), as a test map's does: in-sample, a map's own extremes would shrink its zmax
        loo_mean = (m.sum(0) - m) / (n - 1)
        loo_var = ((m * m).sum(0) - m * m) / (n - 1) - loo_mean * loo_mean
        loo_z = (m - loo_mean) / loo_var.clamp_min(0).sqrt().clamp_min(floor)
        stats = map_statistics(m)
        stats[:, STATISTICS.index("zmax")] = loo_z.flatten(1).amax(1)
        stat_mean, stat_std = stats.mean(0), stats.std(0, unbiased=False)
        stat_std = torch.maximum(stat_std, EPS * (stat_mean.abs() + 1.0))
        return {"stat_mean": stat_mean, "stat_std": stat_std, "pixel_mean": pixel_mean, "pixel_std": pixel_std}

    def fit(self, maps: torch.Tensor, source: str) -> None:
        """Fit the calibration on maps of held-out normal images (source: train_kfold | validation)."""
        for name, value in self.calibration_of(maps).items():
            setattr(self, name, value.to(self.rule.device))
        self.source.fill_(SOURCES.index(source))
        self.n_fit.fill_(int(maps.shape[0]))

    @staticmethod
    def calibrated(maps: torch.Tensor, calib: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Both calibrated scores (B,) of maps under a calibration (see `calibration_of`)."""
        z = (map_statistics(maps, calib["pixel_mean"], calib["pixel_std"]) - calib["stat_mean"].cpu()
             ) / calib["stat_std"].cpu()
        return {"calibrated": z.pow(2).sum(1).sqrt(), "calibrated_upper": z.clamp_min(0).pow(2).sum(1).sqrt()}

    def buffers_calibration(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).cpu() for k in self.fitted_buffers}

    def scores(self, maps: torch.Tensor, official: torch.Tensor, calib: dict | None = None) -> dict[str, torch.Tensor]:
        """Every rule's (B,) float64 scores; calibrated rules only where a calibration exists."""
        maps = maps.detach().float().cpu()
        out = {"official": official.detach().double().cpu(), "max": image_score(maps, "max").double(),
               "top_mean": image_score(maps, "top_mean", TOP_FRACTION).double()}
        calib = calib if calib is not None else (self.buffers_calibration() if self.fitted else None)
        if calib:
            out.update(self.calibrated(maps, calib))
        return out

    def score(self, maps: torch.Tensor, official: torch.Tensor) -> torch.Tensor:
        """The chosen rule's (B,) scores (float32, on the maps' device)."""
        name = self.rule_name
        if name == "official":
            return official
        if name in CALIBRATED and not self.fitted:
            raise TexadError(f"image rule {name!r} needs a fitted calibration (held-out normal maps); none was fitted")
        return self.scores(maps, official)[name].to(device=maps.device, dtype=torch.float32)


def cross_fitted(scorer: ImageScorer, maps: torch.Tensor, labels: torch.Tensor, folds: int = 5
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Calibrated scores of validation maps with the calibration fitted on validation normals, without
    scoring a normal by a calibration it entered: normal image i is scored by the calibration of the
    normals outside its fold, anomalous images by the calibration of all normals. Returns (scores by
    calibrated rule, the all-normals calibration, which the test then uses)."""
    normal = (labels == 0).nonzero().flatten()
    if len(normal) < 2 * folds:
        folds = max(2, len(normal) // 2)
    if len(normal) < 4:
        raise TexadError(f"calibrating image scores on validation needs at least 4 normal validation images, "
                         f"got {len(normal)}")
    full = scorer.calibration_of(maps[normal])
    out = scorer.calibrated(maps, full)
    fold = torch.arange(len(normal)) % folds
    for f in range(folds):
        held, rest = normal[fold == f], normal[fold != f]
        part = scorer.calibrated(maps[held], scorer.calibration_of(maps[rest]))
        for name in CALIBRATED:
            out[name][held] = part[name]
    return out, full


def choose_rule(aurocs: dict[str, float], candidates: Sequence[str] = RULES) -> str:
    """The candidate with the highest validation AUROC; ties (and nan) go to the simplest (earliest)."""
    best, best_value = None, -math.inf
    for name in candidates:
        value = aurocs.get(name)
        if value is None or not math.isfinite(value):
            continue
        if value > best_value:
            best, best_value = name, value
    if best is None:
        raise TexadError(f"no image rule has a finite validation AUROC: {aurocs}")
    return best
