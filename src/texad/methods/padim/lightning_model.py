"""PaDiM as a texad method: per-location Gaussians of the training images, no gradient steps.

`on_fit_start` (see `texad.methods.statistics_module`) reads the training images once and accumulates
the per-location mean and scatter batch by batch (bounded memory); under DDP the ranks' statistics
are merged exactly (Chan et al.'s pairwise formula), so the Gaussians equal a one-process fit up to
float summation order. Mean and precision matrices are buffers saved in the checkpoint.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from texad.backbones import FeatureExtractor
from texad.data.batch import Batch
from texad.errors import TexadError
from texad.methods.padim.torch_model import GaussianStatistics, PaDiMModel
from texad.methods.statistics_module import StatisticsModule, gather_in_image_order


class PaDiM(StatisticsModule):
    """PaDiM (Defard et al. 2020). Keys: ``layers`` (timm out indices), ``n_features`` (random
    channel subset, seeded by ``seed``), ``epsilon`` (Σ + εI), ``blur_sigma``, ``chunk_locations``
    (locations processed at once: the memory knob), ``layer_resampling`` (how coarser layers reach the
    finest one's cells: bilinear | nearest, the re-implementations'); ``epochs`` is accepted and ignored."""

    def __init__(
        self,
        backbone: FeatureExtractor,
        name: str = "padim",
        epochs: int = 0,
        layers: Sequence[int] = (1, 2, 3),
        n_features: int = 100,
        epsilon: float = 0.01,
        blur_sigma: float = 4.0,
        chunk_locations: int = 512,
        layer_resampling: str = "bilinear",
        seed: int = 0,
        image_rule: str = "auto",  # image-score rule (texad.methods.components.image_rule)
        calibration_folds: int = 5,  # k-fold held-out training maps for the calibrated rules
        calibration_images: int = 60,  # held-out images scored for them (at most)
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.model = PaDiMModel(
            backbone, layers=layers, n_features=n_features, epsilon=epsilon, blur_sigma=blur_sigma,
            chunk_locations=chunk_locations, layer_resampling=layer_resampling, seed=seed,
        )

    @property
    def statistics_built(self) -> bool:
        return self.model.fitted

    def build_statistics(self, batches) -> dict[str, Any]:
        stats = GaussianStatistics(self.hparams.chunk_locations)
        size, embs = None, []  # embs: kept for the k-fold held-out maps
        calibrate = self.hparams.image_rule != "official"
        for batch in batches:
            emb, grid = self.model.embedding(batch.image)
            if calibrate:
                embs.append(emb)
                image_size = tuple(batch.image.shape[-2:])
            if size is None:
                size = tuple(emb.shape[-2:])
            elif tuple(emb.shape[-2:]) != size:
                raise TexadError("PaDiM needs training images of one size (set dataset.image_size)")
            stats.update(self.model.locations(emb))
        if size is None:
            raise TexadError("PaDiM: no training images to fit the Gaussians to")
        stats.all_reduce()
        images = stats.count
        calibration_s = time.perf_counter()
        totals = (stats.mean.clone(), stats.scatter.clone()) if calibrate else None
        calibration_s = time.perf_counter() - calibration_s
        self.model.finalize(stats, size)
        start = time.perf_counter()
        if calibrate:  # Gaussians of the other folds score each fold's images (all ranks: all images)
            embs = gather_in_image_order(torch.cat(embs))
            if len(embs) != images:
                raise TexadError(f"PaDiM calibration: {len(embs)} training embeddings for {images} images")
            self.image_scorer.fit(self.model.heldout_maps(embs, grid, image_size, *totals,
                                                          self.hparams.calibration_folds,
                                                          self.hparams.calibration_images), "train_kfold")
        return {"images": images, "locations": size[0] * size[1], "n_features": int(self.model.channels.numel()),
                "calibration_s": round(calibration_s + time.perf_counter() - start, 3)}

    def predict_maps(self, batch: Batch) -> dict[str, torch.Tensor]:
        amap, score = self.model(batch.image)
        return {"anomaly_map": amap, "pred_score": score}
