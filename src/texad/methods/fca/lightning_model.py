"""FCA as a zero-shot texad method: no fit, each test image is scored on its own.

The image is resized to ``feature_input_size`` (the backbone sees about 1024² so a stride-8 layer
gives the ~128² map FCA needs), the chosen layers are read, FCA scores every feature pixel, and the
map is bilinearly resampled to the input size at the cells' true places (``texad.geometry``); the image score is the map's maximum (as the
official evaluation). ``features="pixels"`` runs FCA on the image itself at the dataset's size.

Border (issue 12). Two causes make the official pipeline light up a ring along the border of
*normal* images: the backbone's zero padding (border features see black context) and FCA's
reflect padding of the feature map (border patches hold mirrored duplicates). Texad's defaults
fix both in the model: ``input_padding`` reflect-pads the resized image before the backbone and
crops the feature map back exactly (``texad.backbones.padded_features``), and ``border="valid"``
scores border pixels from in-image windows only (``texad.methods.fca.torch_model``). The official
behaviour is ``method.input_padding=0 method.border=official``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from texad.backbones import PAD_MODES, FeatureExtractor, concat_layers, cropped_grid, padded_features
from texad.data.batch import Batch
from texad.errors import TexadError
from texad.methods.base import AnomalyModule
from texad.geometry import PIXELS, Grid, resample
from texad.methods.fca.features import LayerView, feature_input_size, resize_for_features
from texad.methods.fca.torch_model import BORDERS, FCA

FEATURES = ("backbone", "pixels")


def check_fca_keys(patch_size: int, stride: int, prefix: str = "method.", border: str = "valid") -> None:
    """Config errors named by their key, before FCA's own (key-less) checks."""
    if border not in BORDERS:
        raise TexadError(f"{prefix}border must be one of {list(BORDERS)}, got {border!r}")
    if int(patch_size) < 1 or int(patch_size) % 2 == 0:
        raise TexadError(f"{prefix}patch_size must be a positive odd integer, got {patch_size}")
    if int(stride) <= 0:
        raise TexadError(f"{prefix}stride must be positive, got {stride}")


def check_map_fits(patch_size: int, h: int, w: int, how: str, key: str = "method.patch_size") -> None:
    if patch_size > min(h, w):
        raise TexadError(f"{key}={patch_size} is larger than the feature map {h}x{w} ({how}); "
                         f"use a smaller patch or a larger method.feature_input_size")


class FeatureMaps(nn.Module):
    """Image batch → the feature map FCA reads: backbone layers at an input size, or the pixels.

    ``input_padding`` pixels (of the resized input, a multiple of the layers' strides) are padded
    on every side with ``input_padding_mode`` before the backbone and cropped off every feature map
    (0 = the plain forward, as the official code). Ignored for ``features="pixels"``.
    """

    def __init__(self, backbone: FeatureExtractor | None, features: str, layers: Sequence[int],
                 input_size: int | None, input_padding: int = 0, input_padding_mode: str = "reflect") -> None:
        super().__init__()
        if features not in FEATURES:
            raise TexadError(f"method.features must be one of {list(FEATURES)}, got {features!r}")
        if input_size is not None and int(input_size) < 8:
            raise TexadError(f"method.feature_input_size must be >= 8 or null, got {input_size}")
        self.features = features
        self.input_size = None if input_size is None else int(input_size)
        # the frozen network sits at `backbone` so checkpoints leave it out (model.backbone.*)
        self.backbone = LayerView(backbone, layers) if features == "backbone" else None
        self.input_padding = int(input_padding)
        self.input_padding_mode = input_padding_mode
        if self.input_padding < 0:
            raise TexadError(f"method.input_padding must be >= 0, got {input_padding}")
        if input_padding_mode not in PAD_MODES:
            raise TexadError(f"method.input_padding_mode must be one of {list(PAD_MODES)}, got {input_padding_mode!r}")
        if self.backbone is not None and any(self.input_padding % s for s in self.backbone.strides):
            raise TexadError(f"method.input_padding={self.input_padding} must be a multiple of every feature "
                             f"stride of method.layers {self.backbone.layers} (strides {self.backbone.strides})")

    @property
    def stride(self) -> int:
        return 1 if self.backbone is None else self.backbone.strides[0]

    def map_side(self) -> int | None:
        """Feature map side for a square input, when known before seeing an image."""
        if self.features == "pixels" or self.input_size is None:
            return None
        return self.input_size // self.stride

    def describe(self) -> str:
        if self.backbone is None:
            return "raw pixels at the image size"
        padding = (f", input {self.input_padding_mode}-padded by {self.input_padding} px" if self.input_padding
                   else "")
        return (f"{self.backbone.name} layers {self.backbone.layers} (stride {self.stride}) of the image "
                f"resized to {self.input_size or 'its own size'}{padding}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.backbone is None:
            return images
        resized = resize_for_features(images, self.input_size)

        def extract(x: torch.Tensor) -> tuple[list[torch.Tensor], list[Grid]]:
            maps = self.backbone(x)
            return maps, self.backbone.grids(x.shape[-2:], maps)

        maps, grids = padded_features(extract, resized, self.input_padding, self.input_padding_mode)
        return concat_layers(maps, grids, pool=1)[0]

    def grid(self, image_hw: tuple[int, int], feature_hw: tuple[int, int]) -> Grid:
        """Where the cells of the feature map (`feature_hw`) of an image of `image_hw` sit in that image."""
        if self.backbone is None:
            return PIXELS
        resized = feature_input_size(tuple(image_hw), self.input_size)
        grid = cropped_grid(self.backbone, resized, feature_hw, self.input_padding)
        return grid.through_resize(resized, tuple(image_hw))

    def to_image(self, maps: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """(B, h, w) maps on the feature cells → (B, H, W) on the image's pixels, at their true places."""
        image_hw = tuple(image_hw)
        return resample(maps, self.grid(image_hw, tuple(maps.shape[-2:])), image_hw)


class FCAMethod(AnomalyModule):
    """Feature Correspondence Analysis (Ardelean & Weyrich, WACV 2024), zero-shot.

    Keys: ``features`` (backbone | pixels), ``layers`` (timm out indices of the backbone; the
    official WRN50-2 layer2 is stride 8, for efficientnet_lite0 that is index 2, 40 channels),
    ``feature_input_size`` (side fed to the backbone; null = the image size), ``input_padding`` and
    ``input_padding_mode`` (padding of the resized image before the backbone, cropped back), FCA's
    ``patch_size``, ``stride``, ``sigma_p``, ``blur_kernel``, ``sigma_s``, ``reference``,
    ``chunk_rows``, ``normalize``, ``border`` and ``seed``. ``epochs`` is accepted and ignored
    (nothing is trained). Official behaviour: ``input_padding=0, border="official"``.
    """

    needs_fit = False

    def __init__(
        self,
        backbone: FeatureExtractor | None = None,
        name: str = "fca",
        features: str = "backbone",
        layers: Sequence[int] = (2,),
        feature_input_size: int | None = 1024,
        input_padding: int = 32,
        input_padding_mode: str = "reflect",
        patch_size: int = 9,
        stride: int = 1,
        sigma_p: float = 3.0,
        blur_kernel: int | None = 5,
        sigma_s: float | None = 1.0,
        reference: str = "median",
        chunk_rows: int = 8,
        normalize: str | None = "minmax",
        border: str = "valid",
        seed: int = 0,
        epochs: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        check_fca_keys(patch_size, stride, border=border)
        if features == "backbone" and backbone is None:
            raise TexadError("method=fca with method.features=backbone needs a backbone")
        self.model = FeatureMaps(backbone, features, layers, feature_input_size, input_padding, input_padding_mode)
        side = self.model.map_side()
        if side is not None:
            check_map_fits(patch_size, side, side, self.model.describe())
        try:
            self.model.fca = FCA(patch_size=patch_size, stride=stride, sigma_p=sigma_p, blur_kernel=blur_kernel,
                                 sigma_s=sigma_s, reference=reference, chunk_rows=chunk_rows,
                                 normalize=normalize, seed=seed, border=border)
        except TexadError as err:
            raise TexadError(f"method: {err}") from err

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def predict_maps(self, batch: Batch) -> dict[str, Any]:
        feats = self.feature_map(batch.image)
        check_map_fits(self.hparams.patch_size, *feats.shape[-2:], self.model.describe())
        amap = self.model.to_image(self.model.fca(feats), batch.image.shape[-2:])
        return {"anomaly_map": amap, "pred_score": amap.flatten(1).amax(1)}
