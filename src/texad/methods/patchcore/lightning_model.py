"""PatchCore as a texad method: the memory bank is the whole fit (no gradient steps).

`on_fit_start` (see `texad.methods.statistics_module`) reads the training images once, keeps their
locally aware patch features, selects the greedy coreset on a random projection of them and stores
the selected (unprojected) features as the bank, a buffer saved in the checkpoint. Under DDP the
features of all ranks are gathered in image order and rank 0 selects the coreset (then broadcast),
so the bank equals a one-process fit.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import torch
import torch.distributed as dist

from texad.backbones import FeatureExtractor
from texad.data.batch import Batch
from texad.errors import TexadError
from texad.methods.patchcore.torch_model import PatchCoreModel, greedy_coreset, random_projection
from texad.methods.statistics_module import StatisticsModule, distributed, gather_in_image_order

log = logging.getLogger(__name__)


class PatchCore(StatisticsModule):
    """PatchCore (Roth et al. 2022). Keys: ``layers`` (timm out indices, two mid-level layers),
    ``pool`` (neighbourhood of the local average), ``coreset_fraction``, ``projection_dim``,
    ``block_rows`` (rows per block of the greedy selection), ``reweight`` and ``num_neighbors`` (the
    paper's image-score reweighting), ``blur_sigma``, ``distance_budget_mb`` (memory of the search),
    ``seed``; ``epochs`` is accepted and ignored."""

    def __init__(
        self,
        backbone: FeatureExtractor,
        name: str = "patchcore",
        epochs: int = 0,
        layers: Sequence[int] = (2, 3),
        pool: int = 3,
        coreset_fraction: float = 0.1,
        projection_dim: int = 128,
        block_rows: int = 1024,
        reweight: bool = False,
        num_neighbors: int = 9,
        blur_sigma: float = 4.0,
        distance_budget_mb: float = 256.0,
        seed: int = 0,
        image_rule: str = "auto",  # image-score rule (texad.methods.components.image_rule)
        calibration_folds: int = 5,  # k-fold held-out training maps for the calibrated rules
        calibration_images: int = 60,  # held-out images scored for them (at most)
    ) -> None:
        super().__init__()
        if not 0.0 < float(coreset_fraction) <= 1.0:
            raise TexadError(f"method.coreset_fraction must be in (0, 1], got {coreset_fraction}")
        if int(projection_dim) < 0:
            raise TexadError(f"method.projection_dim must be >= 0 (0 = no projection), got {projection_dim}")
        self.save_hyperparameters(ignore=["backbone"])
        self.model = PatchCoreModel(
            backbone, layers=layers, pool=pool, blur_sigma=blur_sigma, reweight=reweight,
            num_neighbors=num_neighbors, distance_budget_mb=distance_budget_mb,
        )

    @property
    def statistics_built(self) -> bool:
        return self.model.bank_built

    def build_statistics(self, batches) -> dict[str, Any]:
        start = time.perf_counter()
        per_image = []
        for batch in batches:
            feats, grid = self.model.features(batch.image)  # (B, D, h, w)
            cells, image_hw = tuple(feats.shape[-2:]), tuple(batch.image.shape[-2:])
            per_image.append(feats.permute(0, 2, 3, 1).reshape(feats.shape[0], -1, feats.shape[1]).float())
        if not per_image:
            raise TexadError("PatchCore: no training images to build the memory bank from")
        local = torch.cat(per_image)
        images = gather_in_image_order(local)  # (N images, h·w, D), one-process order
        patches = images.reshape(-1, images.shape[-1])
        features_s = time.perf_counter() - start
        n_select = max(1, int(round(self.hparams.coreset_fraction * patches.shape[0])))
        start = time.perf_counter()
        if not distributed() or dist.get_rank() == 0:
            projected = random_projection(patches, self.hparams.projection_dim, self.hparams.seed)
            picks = greedy_coreset(projected, n_select, seed=self.hparams.seed, block_rows=self.hparams.block_rows)
        if distributed():
            size = torch.tensor([picks.numel() if dist.get_rank() == 0 else 0], device=patches.device)
            dist.broadcast(size, 0)
            if dist.get_rank() != 0:
                picks = torch.zeros(int(size), dtype=torch.long)
            picks = picks.to(patches.device)
            dist.broadcast(picks, 0)
        self.model.set_bank(patches, picks)
        coreset_s = time.perf_counter() - start
        start = time.perf_counter()
        if self.hparams.image_rule != "official":  # k-fold held-out maps for the calibrated rules
            self.image_scorer.fit(self.model.heldout_maps(images, patches, picks.cpu(), cells, grid, image_hw,
                                                          self.hparams.calibration_folds,
                                                          self.hparams.calibration_images), "train_kfold")
        return {
            "images": int(images.shape[0]),
            "patches": int(patches.shape[0]),
            "feature_dim": int(patches.shape[1]),
            "bank_size": int(picks.numel()),
            "features_s": round(features_s, 3),
            "coreset_s": round(coreset_s, 3),
            "calibration_s": round(time.perf_counter() - start, 3),
        }

    def predict_maps(self, batch: Batch) -> dict[str, torch.Tensor]:
        amap, score = self.model(batch.image)
        return {"anomaly_map": amap, "pred_score": score}
