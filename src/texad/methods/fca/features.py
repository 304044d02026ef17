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

from functools import partial
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from texad.backbones import FeatureExtractor, channels_last_forward
from texad.errors import TexadError
from texad.geometry import Grid, LayerGeometry

__all__ = ["LayerView", "feature_input_size", "resize_for_features"]


class LayerView(nn.Module):
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
        self.geometry = LayerGeometry(self.forward, self.strides, lambda: self.net, f"{arch} layers {self.layers}",
                                      backbone.geometry.alignment, backbone.geometry.cache_dir)

    def grids(self, input_hw: tuple[int, int], maps: Sequence[torch.Tensor]) -> list[Grid]:
        """Where the cells of `maps` (the output for an input of `input_hw`) sit in the input."""
        return self.geometry.grids_of(input_hw, maps)

    def train(self, mode: bool = True) -> "LayerView":
        """Stay in eval mode: batch-norm statistics of a frozen backbone must not move."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return channels_last_forward(partial(self.net.forward_intermediates, indices=self.layers,
                                             intermediates_only=True), images)


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
