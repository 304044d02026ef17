"""FCA as a zero-shot texad method: no fit, each test image is scored on its own.

The image is resized to ``feature_input_size`` (the backbone sees about 1024² so a stride-8 layer
gives the ~128² map FCA needs), the chosen layers are read (``texad.methods.components.feature_maps``),
FCA scores every feature pixel (``texad.methods.components.fca``), and the map is bilinearly resampled to
the input size at the cells' true places (``texad.geometry``); the image score is the map's maximum (as
the official evaluation). ``features="pixels"`` runs FCA on the image itself at the dataset's size.
See README.md beside this file.

Border (issue 12). Two causes make the official pipeline light up a ring along the border of
*normal* images: the backbone's zero padding (border features see black context) and FCA's
reflect padding of the feature map (border patches hold mirrored duplicates). Texad's defaults
fix both in the model: ``input_padding`` reflect-pads the resized image before the backbone and
crops the feature map back exactly (``texad.backbones.padded_features``), and ``border="valid"``
scores border pixels from in-image windows only (``texad.methods.components.fca``). The official
behaviour is ``method.input_padding=0 method.border=official``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from texad.backbones import FeatureExtractor
from texad.data.batch import Batch
from texad.errors import TexadError
from texad.methods.base import AnomalyModule
from texad.methods.components.fca import check_fca_keys
from texad.methods.fca.torch_model import FCAModel


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
        image_rule: str = "auto",  # image-score rule (texad.methods.components.image_rule)
        epochs: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        check_fca_keys(patch_size, stride, border=border)
        if features == "backbone" and backbone is None:
            raise TexadError("method=fca with method.features=backbone needs a backbone")
        self.model = FCAModel(backbone, features, layers, feature_input_size, input_padding, input_padding_mode,
                              patch_size=patch_size, stride=stride, sigma_p=sigma_p, blur_kernel=blur_kernel,
                              sigma_s=sigma_s, reference=reference, chunk_rows=chunk_rows, normalize=normalize,
                              seed=seed, border=border)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def predict_maps(self, batch: Batch) -> dict[str, Any]:
        amap = self.model.anomaly_map(batch.image)
        return {"anomaly_map": amap, "pred_score": amap.flatten(1).amax(1)}
