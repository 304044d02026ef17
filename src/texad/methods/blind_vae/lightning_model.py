"""Blind localisation as a texad method: a per-location feature VAE fitted on the unlabelled test set.

Use it with ``setting=blind`` (the training set is then the test images). The backbone is frozen, so
the min–max scaled features of every training image are computed once at fit start and kept in
memory (by path); each step then draws ``vectors_per_step`` random feature vectors from the
batch's images, which makes an epoch cheap on a CPU. The VAE is per location (1×1 convs), so a
random subset of vectors is an unbiased sample of the official all-locations batch.

Scores: ``score="fca"`` (default) runs FCA (t=7, no rescaling) on the signed residual
features − decoder(μ); ``score="residual_norm"`` is the plain L2-norm baseline. Both are
post-processed the same way (blur 5/σ 1, zero a ``zero_border`` frame at feature resolution), then
bilinearly resampled to the input size at the cells' true places (``texad.geometry``); the image
score is the map's maximum.

Border (issue 12). The official code zeroes a 5-cell frame of the 64² map because the border of
its FCA map is hot (backbone zero padding, FCA's reflect-padded patches); a defect touching the
border is then lost. Texad removes the causes instead, as for FCA: the resized image is
reflect-padded by ``input_padding`` pixels before the backbone and the features cropped back, and
FCA on the residual uses in-image windows (``border="valid"``), so ``zero_border`` defaults to 0.
What remains is the VAE's own border: on the images it was fitted on, it reconstructs border cells
worse than interior ones (ring ratio 1.21 on 256² brick; held-out normals show less of it).
``calibration="location"`` (conf/method/blind_vae.yaml; the class default is "none") divides the map
by each location's median level over the training images (robust to the defects of a contaminated
set; no labels), computed at the end of the fit and before each validation during it.
The official behaviour is ``method.input_padding=0 method.border=official method.zero_border=5
method.calibration=none``.

Iterations: the official code runs a fixed 10 000 AdamW steps of 8 images × 64² vectors on a GPU, whatever
the size of the set. Texad keeps that design at a CPU budget: ``max_steps=520`` steps (the trainer's
``max_steps``) of ``vectors_per_step=8192`` vectors drawn from ``batch_size`` images, so every image of the
set is fitted and the cost does not grow with the set (520 = 40 epochs of the 52-image embedded test sets
of texad ≤ 0.1, whose results it reproduces step for step); the official AdamW settings otherwise (lr 1e-4,
weight decay 0.1). ``max_steps=-1`` trains ``epochs`` passes instead; see conf/method/blind_vae.yaml.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from texad.backbones import FeatureExtractor
from texad.data.batch import Batch
from texad.errors import TexadError
from texad.methods.base import AnomalyModule
from texad.methods.blind_vae.torch_model import (
    FeatureVAE,
    LocationCalibration,
    residual_map_fca,
    residual_norm,
    smooth_and_clear_border,
)
from texad.methods.components.fca import FCA, check_fca_keys, check_map_fits
from texad.methods.components.feature_maps import FeatureMaps, scale_features_minmax

SCORES = ("fca", "residual_norm")
CALIBRATIONS = ("location", "none")


class BlindVAEMethod(AnomalyModule):
    """FCA on the residuals of a feature VAE trained on the contaminated set (BlindLCA, CVPRW 2024)."""

    def __init__(
        self,
        backbone: FeatureExtractor | None = None,
        name: str = "blind_vae",
        features: str = "backbone",
        layers: Sequence[int] = (2,),
        feature_input_size: int | None = 512,
        input_padding: int = 32,
        input_padding_mode: str = "reflect",
        latent: int = 128,
        hidden: int = 512,
        kl_weight: float = 1e-3,
        lr: float = 1e-4,
        weight_decay: float = 0.1,
        epochs: int = 40,
        max_steps: int | None = None,  # conf/method/blind_vae.yaml: 520
        vectors_per_step: int = 8192,
        score: str = "fca",
        patch_size: int = 7,
        stride: int = 1,
        sigma_p: float = 3.0,
        blur_kernel: int | None = 5,
        sigma_s: float | None = 1.0,
        chunk_rows: int = 8,
        border: str = "valid",
        smooth_kernel: int = 5,
        smooth_sigma: float = 1.0,
        zero_border: int = 0,
        calibration: str = "none",  # conf/method/blind_vae.yaml: location
        calibration_sigma: float = 2.0,
        seed: int = 0,
        image_rule: str = "auto",  # image-score rule (texad.methods.components.image_rule)
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        if score not in SCORES:
            raise TexadError(f"method.score must be one of {list(SCORES)}, got {score!r}")
        if vectors_per_step < 1:
            raise TexadError(f"method.vectors_per_step must be positive, got {vectors_per_step}")
        if max_steps is not None and int(max_steps) != -1 and int(max_steps) < 1:
            raise TexadError(f"method.max_steps must be positive, or -1 to train method.epochs passes; got {max_steps}")
        check_fca_keys(patch_size, stride, border=border)
        if zero_border < 0:
            raise TexadError(f"method.zero_border must be >= 0, got {zero_border}")
        if calibration not in CALIBRATIONS:
            raise TexadError(f"method.calibration must be one of {list(CALIBRATIONS)}, got {calibration!r}")
        self.model = FeatureMaps(backbone, features, layers, feature_input_size, input_padding, input_padding_mode)
        side = self.model.map_side()
        if side is not None:
            check_map_fits(patch_size, side, side, self.model.describe())
        channels = 3 if self.model.backbone is None else sum(self.model.backbone.channels)
        torch.manual_seed(seed)
        self.model.vae = FeatureVAE(channels, hidden=hidden, latent=latent)
        try:
            self.model.fca = FCA(patch_size=patch_size, stride=stride, sigma_p=sigma_p, blur_kernel=blur_kernel,
                                 sigma_s=sigma_s, chunk_rows=chunk_rows, normalize=None, border=border)
        except TexadError as err:
            raise TexadError(f"method: {err}") from err
        self.model.calibration = LocationCalibration(calibration_sigma)
        self._train_features: dict[str, torch.Tensor] = {}
        self._fitted_maps: dict[str, torch.Tensor] = {}  # path → raw map under the fitted VAE (see on_fit_end)
        self._sampler = torch.Generator().manual_seed(seed)

    def scaled_features(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE's input: per-image, per-channel min–max scaled features (as the official code)."""
        return scale_features_minmax(self.model(images))

    # --- fit -----------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Cache the frozen features of every training image once (the data sets are small)."""
        dm = self.trainer.datamodule
        self._train_features, self._fitted_maps = {}, {}
        for batch in tqdm(dm.fit_statistics_dataloader(), desc="features", leave=False,
                          disable=self.trainer.global_rank != 0):
            feats = self.scaled_features(batch.image.to(self.device))
            self._train_features.update(zip(batch.path, feats.cpu()))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        feats = torch.stack([self._train_features[p] for p in batch.path])
        c = feats.shape[1]
        vectors = feats.permute(0, 2, 3, 1).reshape(-1, c)
        n = min(self.hparams.vectors_per_step, len(vectors))
        pick = torch.randperm(len(vectors), generator=self._sampler)[:n]
        x = vectors[pick].to(self.device).T.reshape(1, c, n, 1)
        recon, mu, logvar = self.model.vae(x)
        loss, mse, kl = FeatureVAE.loss(x, recon, mu, logvar, self.hparams.kl_weight)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(batch))
        self.log("train/mse", mse, on_step=False, on_epoch=True, batch_size=len(batch))
        self.log("train/kl", kl, on_step=False, on_epoch=True, batch_size=len(batch))
        return loss

    def calibrate(self, features: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor | None:
        """Fit the per-location calibration on scaled features (C, h, w) of the training images, for the
        VAE as it is now (a no-op with ``calibration="none"``); returns their raw maps (None if no-op)."""
        if self.hparams.calibration != "location":
            return None
        feats = list(features)
        with torch.no_grad():
            maps = torch.cat([self._raw_maps(torch.stack(feats[i:i + 8]).to(self.device)).cpu()
                              for i in range(0, len(feats), 8)])
        self.model.calibration.fit(maps)
        return maps

    def _calibrate(self) -> torch.Tensor | None:
        return self.calibrate(list(self._train_features.values())) if self._train_features else None

    def on_validation_epoch_start(self) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._calibrate()  # the VAE moved since the last validation

    def on_fit_end(self) -> None:
        maps = self._calibrate()
        # The blind protocol tests the images it was fitted on: their raw maps under the final VAE are
        # kept for the test pass (the same computation, done once)
        self._fitted_maps = {} if maps is None else dict(zip(self._train_features, maps))
        self._train_features = {}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.vae.parameters(), lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay)

    # --- inference -----------------------------------------------------------------------------
    def _raw_maps(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, h, w) maps at feature resolution from scaled features, before calibration."""
        smoothing = (self.hparams.smooth_kernel, self.hparams.smooth_sigma, self.hparams.zero_border)
        if self.hparams.score == "residual_norm":
            return smooth_and_clear_border(residual_norm(feats, self.model.vae), *smoothing)
        check_map_fits(self.hparams.patch_size, *feats.shape[-2:], self.model.describe())
        return residual_map_fca(feats, self.model.vae, self.model.fca, *smoothing)

    def predict_maps(self, batch: Batch) -> dict[str, Any]:
        if self._fitted_maps and all(p in self._fitted_maps for p in batch.path):
            maps = torch.stack([self._fitted_maps[p] for p in batch.path]).to(batch.image.device)
        else:
            maps = self._raw_maps(self.scaled_features(batch.image))
        if self.hparams.calibration == "location":
            maps = self.model.calibration(maps)
        amap = self.model.to_image(maps, batch.image.shape[-2:])
        return {"anomaly_map": amap, "pred_score": amap.flatten(1).amax(1)}
