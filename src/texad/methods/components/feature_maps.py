"""The feature maps FCA (and the blind VAE) read: chosen backbone layers at a chosen input size, or pixels.

FCA lives on feature *resolution*: a defect a few pixels wide must still cover several feature
cells. The official code feeds MVTec images at 1024² to a stride-8 layer (a 128² map). Our images
arrive at ``dataset.image_size`` (256²), so the image is bilinearly resized to ``input_size``
before the backbone.

The backbone handed to a method is built from ``conf/backbone`` with its own layers (e.g. [1, 2, 3]).
FCA needs one mid-level layer, and running deeper blocks at 1024² only costs time. So
:class:`LayerView` is the same timm network *cut after the deepest requested layer*, with the
weights copied from the given backbone (never re-downloaded, never random).
"""

from __future__ import annotations

from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from texad.backbones import PAD_MODES, FeatureExtractor, FrozenLayers, concat_layers, cropped_grid, padded_features
from texad.errors import TexadError
from texad.geometry import PIXELS, Grid, LayerGeometry, resample

__all__ = ["FEATURES", "FeatureMaps", "LayerView", "feature_input_size", "resize_for_features", "scale_features_minmax"]

#: what FCA-style methods read: backbone layers, or the image's own pixels
FEATURES = ("backbone", "pixels")


class LayerView(FrozenLayers):
    """Frozen view of ``backbone`` returning only ``layers`` (timm out indices), cut after the last.

    ``key`` names the config entry in error messages (e.g. ``method.layers``).
    """

    def __init__(self, backbone: FeatureExtractor, layers: Sequence[int], key: str = "method.layers") -> None:
        super().__init__()
        self.layers = sorted({int(i) for i in layers})
        if not self.layers:
            raise TexadError(f"{key} must name at least one backbone layer")
        arch = backbone.name.split(".")[0]
        try:
            net = timm.create_model(arch, pretrained=False)
            net.prune_intermediate_layers(indices=self.layers, prune_norm=True, prune_head=True)
        except Exception as err:
            raise TexadError(f"{key}={self.layers} is not valid for backbone {backbone.name!r}: {err}") from err
        source, own = backbone.model.state_dict(), net.state_dict()
        missing = [k for k in own if k not in source]
        if missing:
            raise TexadError(
                f"{key}={self.layers} needs blocks that the backbone (backbone.layers={list(backbone.layers)}) "
                f"does not hold (e.g. {missing[0]}); add the layer to backbone.layers"
            )
        net.load_state_dict({k: v for k, v in source.items() if k in own})
        self.net = net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.name = backbone.name
        with torch.no_grad():
            probe = self(torch.zeros(1, 3, 128, 128))
        self.channels = [p.shape[1] for p in probe]
        self.strides = [128 // p.shape[-1] for p in probe]
        self.feature_store = backbone.feature_store  # the backbone's store (texad.feature_store), keyed by this view
        self.geometry = LayerGeometry(self.compute, self.strides, lambda: self.net, f"{arch} layers {self.layers}",
                                      backbone.geometry.alignment, backbone.geometry.cache_dir)

    def layer_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.net.forward_intermediates(images, indices=self.layers, intermediates_only=True))


def feature_input_size(image_hw: tuple[int, int], input_size: int | None) -> tuple[int, int]:
    """The size the image is resized to: the longer side ``input_size`` (aspect kept); None keeps it."""
    h, w = image_hw
    if not input_size:
        return (h, w)
    scale = input_size / max(h, w)
    return (max(1, round(h * scale)), max(1, round(w * scale)))


def resize_for_features(images: torch.Tensor, input_size: int | None) -> torch.Tensor:
    """Bilinear resize (half-pixel convention) to `feature_input_size`."""
    size = feature_input_size(tuple(images.shape[-2:]), input_size)
    if size == tuple(images.shape[-2:]):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def scale_features_minmax(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min–max scale each channel of each image to [0, 1], as the official FCA and BlindLCA code does."""
    flat = features.flatten(start_dim=2)
    low = flat.min(dim=-1).values[..., None, None]
    high = flat.max(dim=-1).values[..., None, None]
    return (features - low) / (high - low + eps)


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
