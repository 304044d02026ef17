"""Sp-CFA's superpixel views, built per item inside the dataset (so in DataLoader workers).

SLIC labels, mosaic and inverse live in `texad.data.superpixels` (data preparation: the data layer
never imports from `methods/`).

The builder is a plain class instance (not a closure) so DataLoader workers can pickle it. It runs
SLIC on the image exactly as the model sees it (already resized to the model size, and with any
synthetic validation defect already planted), so labels, mosaics and score maps share one
resolution. Labels are cached on disk by `SuperpixelCache`, whose key includes a digest of those
pixels: a synthetic-defect copy never reuses the labels of its clean file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from texad.data.images import to_tensor
from texad.errors import TexadError
from texad.data.superpixels import MOSAIC_FILLS, SuperpixelCache, arrange_tiles, build_mosaic, guard_corner, slic_labels

#: superpixel-view settings when the config gives none: OpenCV's SLIC defaults with connectivity
#: enforced, the mosaic's fill of its free area (`build_mosaic`; "zeros" is the paper's), the side in
#: pixels of the mosaic's top-left square kept free of real tiles (`guard_corner`; 0 is the paper's
#: layout), the tile order ("place": `arrange_tiles`, tiles where their superpixels are; "label":
#: slot = SLIC label id, the paper's literal reading) and the size at which region sizes are given
#: (`region_size_reference`: region sizes are pixels at reference² and scale with the model input,
#: so one config builds the same view at 128² and 256²; null: pixels of the model input as given).
#: method.slic.mosaic_fill=zeros mosaic_guard=0 mosaic_order=label is the paper's mosaic.
#: The whole dict is part of the trained-view cache key (`method.slic`).
DEFAULT_SLIC = {
    "ruler": 10.0, "iterations": 10, "min_element_size": 25, "mosaic_fill": "reflect", "mosaic_guard": 32,
    "mosaic_order": "place", "region_size_reference": None,
}
#: keys of DEFAULT_SLIC that are not SLIC's own arguments (kept out of the label cache key)
MOSAIC_KEYS = ("mosaic_fill", "mosaic_guard", "mosaic_order", "region_size_reference")
MOSAIC_ORDERS = ("place", "label")


def scaled_region_size(region_size: int, height: int, width: int, reference: int | None) -> int:
    """The region size in pixels of an image of height x width: `region_size` pixels at `reference`²,
    scaled by min(height, width) / reference and rounded (at least 1); `reference` None: as given."""
    if reference is None:
        return int(region_size)
    return max(1, int(round(region_size * min(height, width) / reference)))


class SuperpixelViews:
    """`(image uint8 HxWx3, path, mean, std) -> {"superpixels": (L,H,W) int64, "mosaics": (L,3,H,W)}`.

    One level per region size, in the order given (the order of the model's active views).
    `cache_dir=None` computes SLIC every time (no disk cache).
    """

    def __init__(
        self, region_sizes: Sequence[int], cache_dir: str | Path | None = None, slic: dict | None = None
    ) -> None:
        if not region_sizes:
            raise TexadError("SuperpixelViews needs at least one region size")
        self.region_sizes = [int(r) for r in region_sizes]
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        settings = {**DEFAULT_SLIC, **(slic or {})}
        unknown = sorted(set(settings) - set(DEFAULT_SLIC))
        if unknown:
            raise TexadError(f"method.slic has unknown keys {unknown}; expected some of {sorted(DEFAULT_SLIC)}")
        if settings["mosaic_fill"] not in MOSAIC_FILLS:
            raise TexadError(
                f"method.slic.mosaic_fill must be one of {list(MOSAIC_FILLS)}, got {settings['mosaic_fill']!r}"
            )
        self.slic = {k: v for k, v in settings.items() if k not in MOSAIC_KEYS}  # SLIC's own arguments
        self.mosaic_fill = str(settings["mosaic_fill"])
        guard = settings["mosaic_guard"]
        if isinstance(guard, bool) or not isinstance(guard, int) or guard < 0:
            raise TexadError(f"method.slic.mosaic_guard must be an int >= 0 (pixels), got {guard!r}")
        self.mosaic_guard = guard
        self.mosaic_order = str(settings["mosaic_order"])
        if self.mosaic_order not in MOSAIC_ORDERS:
            raise TexadError(f"method.slic.mosaic_order must be one of {list(MOSAIC_ORDERS)}, got {self.mosaic_order!r}")
        reference = settings["region_size_reference"]
        if reference is not None and (isinstance(reference, bool) or not isinstance(reference, int) or reference < 1):
            raise TexadError(f"method.slic.region_size_reference must be null or an int >= 1 (pixels), got {reference!r}")
        self.region_size_reference = reference
        self._cache: SuperpixelCache | None = None  # opened lazily, once per worker process

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    def labels(self, image: np.ndarray, path: str, region_size: int) -> np.ndarray:
        if self.cache_dir is None:
            return slic_labels(image, region_size, **self.slic)
        if self._cache is None:
            self._cache = SuperpixelCache(self.cache_dir)
        return self._cache.labels_for(path, image, region_size, **self.slic)

    def __call__(
        self, image: np.ndarray, path: str, mean: Sequence[float], std: Sequence[float]
    ) -> dict[str, torch.Tensor]:
        labels, mosaics = [], []
        arrange = arrange_tiles if self.mosaic_order == "place" else guard_corner
        for rs in self.region_sizes:
            rs = scaled_region_size(rs, image.shape[0], image.shape[1], self.region_size_reference)
            lab = arrange(self.labels(image, path, rs), self.mosaic_guard)  # label id = tile slot
            labels.append(torch.from_numpy(lab.astype(np.int64)))
            mosaics.append(to_tensor(build_mosaic(image, lab, self.mosaic_fill), mean, std))
        return {"superpixels": torch.stack(labels), "mosaics": torch.stack(mosaics)}

    def __repr__(self) -> str:
        return (
            f"SuperpixelViews(region_sizes={self.region_sizes}, slic={self.slic}, "
            f"mosaic_fill={self.mosaic_fill!r}, mosaic_guard={self.mosaic_guard}, mosaic_order={self.mosaic_order!r}, "
            f"region_size_reference={self.region_size_reference}, cache_dir={self.cache_dir!r})"
        )
