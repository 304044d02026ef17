"""A method written the way docs/adding-a-method.md says, kept outside src/ and registered by config alone
(tiny_method/conf/method/mean_distance.yaml): tests/test_adding_a_method.py runs it through train.py.

Mean feature distance: the fit is the mean feature vector of the normal training images at every
location of the feature map; the anomaly map is each location's Euclidean distance to that mean,
resampled to the image at the cells' true places (``FeatureMaps.to_image``); the image score is the
map's maximum. No gradient step: a ``StatisticsModule``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from texad.backbones import FeatureExtractor
from texad.data.batch import Batch
from texad.errors import TexadError
from texad.methods.components.feature_maps import FeatureMaps
from texad.methods.components.fitted_state import FittedBuffers
from texad.methods.statistics_module import StatisticsModule


class MeanFeatures(FittedBuffers):
    """Feature maps and their per-location mean over the normal training images."""

    fitted_buffers = ("mean",)

    def __init__(self, backbone: FeatureExtractor, layers: Sequence[int], input_size: int | None) -> None:
        super().__init__()
        self.features = FeatureMaps(backbone, "backbone", layers, input_size)
        self.register_buffer("mean", torch.empty(0))

    def distance(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w): each location's distance to the mean feature there."""
        feats = self.features(images)
        if feats.shape[1:] != self.mean.shape:
            raise TexadError(f"mean_distance: feature map {tuple(feats.shape[1:])} does not fit the fitted mean "
                             f"{tuple(self.mean.shape)} (another image size than the fit?)")
        return (feats - self.mean).norm(dim=1)


class MeanFeatureDistance(StatisticsModule):
    """Distance to the per-location mean normal feature (a baseline of a baseline)."""

    def __init__(self, backbone: FeatureExtractor, name: str = "mean_distance", layers: Sequence[int] = (1,),
                 feature_input_size: int | None = None, epochs: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.model = MeanFeatures(backbone, layers, feature_input_size)

    @property
    def statistics_built(self) -> bool:
        return self.model.mean.numel() > 0

    def build_statistics(self, batches) -> dict[str, Any]:
        total, count = None, 0
        for batch in batches:
            feats = self.model.features(batch.image)
            total = feats.sum(0) if total is None else total + feats.sum(0)
            count += feats.shape[0]
        if not count:
            raise TexadError("mean_distance: no training images to fit on")
        self.model.mean = total / count
        return {"images": count, "feature_map": list(self.model.mean.shape)}

    def predict_maps(self, batch: Batch) -> dict[str, torch.Tensor]:
        amap = self.model.features.to_image(self.model.distance(batch.image), batch.image.shape[-2:])
        return {"anomaly_map": amap, "pred_score": amap.flatten(1).amax(1)}
