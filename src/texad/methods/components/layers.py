"""Which of the backbone's returned maps a method reads."""

from __future__ import annotations

from typing import Sequence

from texad.backbones import FeatureExtractor
from texad.errors import TexadError

__all__ = ["select_layers"]


def select_layers(backbone: FeatureExtractor, layers: Sequence[int], key: str = "method.layers") -> list[int]:
    """Positions of `layers` (timm out indices) among the backbone's outputs."""
    layers = [int(i) for i in layers]
    if len(layers) == 0:
        raise TexadError(f"{key} must name at least one backbone layer")
    missing = [i for i in layers if i not in backbone.layers]
    if missing:
        raise TexadError(
            f"{key}={layers} needs backbone layers {missing} that the backbone does not return "
            f"(backbone.layers={list(backbone.layers)}); add them to backbone.layers"
        )
    return [backbone.layers.index(i) for i in layers]
