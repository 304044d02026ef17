"""FCA's model: the feature maps it reads (``texad.methods.components.feature_maps``), FCA on them
(``texad.methods.components.fca``), and the map resampled to the input at the cells' true places.

Both parts are shared components (the blind VAE runs the same FCA on its residual); this module is
where they are put together as FCA the method, so ``lightning_model.py`` holds only the Lightning side.
State keys are those of the parts (``backbone.*`` left out of checkpoints, ``fca.*``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from texad.backbones import FeatureExtractor
from texad.errors import TexadError
from texad.methods.components.fca import FCA, check_map_fits
from texad.methods.components.feature_maps import FeatureMaps


class FCAModel(FeatureMaps):
    """Image batch → feature map (``forward``, from ``FeatureMaps``) → FCA map at input size (``anomaly_map``)."""

    def __init__(self, backbone: FeatureExtractor | None, features: str, layers: Sequence[int],
                 feature_input_size: int | None, input_padding: int, input_padding_mode: str, *, patch_size: int,
                 stride: int, sigma_p: float, blur_kernel: int | None, sigma_s: float | None, reference: str,
                 chunk_rows: int, normalize: str | None, seed: int, border: str) -> None:
        super().__init__(backbone, features, layers, feature_input_size, input_padding, input_padding_mode)
        self.patch_size = int(patch_size)
        side = self.map_side()
        if side is not None:
            check_map_fits(patch_size, side, side, self.describe())
        try:
            self.fca = FCA(patch_size=patch_size, stride=stride, sigma_p=sigma_p, blur_kernel=blur_kernel,
                           sigma_s=sigma_s, reference=reference, chunk_rows=chunk_rows,
                           normalize=normalize, seed=seed, border=border)
        except TexadError as err:
            raise TexadError(f"method: {err}") from err

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) FCA map of each image alone, at the images' size."""
        feats = self(images)
        check_map_fits(self.patch_size, *feats.shape[-2:], self.describe())
        return self.to_image(self.fca(feats), images.shape[-2:])
