"""CFA / Sp-CFA as a LightningModule around `CFAModel`."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from texad.backbones import FeatureExtractor
from texad.data.batch import Batch
from texad.errors import TexadError
from texad.methods.base import AnomalyModule
from texad.methods.cfa.torch_model import CFAModel


def _check_alpha(alpha: Sequence[float], region_sizes: Sequence[int | None]) -> None:
    if len(alpha) != 3:
        raise TexadError(f"method.alpha must have 3 weights [α_org, α_small, α_big], got {list(alpha)}")
    if len(region_sizes) != 2:
        raise TexadError(f"method.region_sizes must be [rs_small, rs_big] (null = view off), got {list(region_sizes)}")
    for a, rs, name in zip(alpha[1:], region_sizes, ("small", "big")):
        if rs is None and float(a) != 0.0:
            raise TexadError(f"method.alpha gives weight {a} to the {name} view, but its region size is null (off)")


class CFA(AnomalyModule):
    """Coupled-hypersphere feature adaptation (Lee et al. 2022); Sp-CFA when region sizes are set.

    The memory banks are built once at fit start from the normal training images (reduced across
    DDP ranks) and saved in the checkpoint; a resumed fit reuses them.
    """

    def __init__(
        self,
        backbone: FeatureExtractor,
        name: str = "cfa",
        epochs: int = 30,
        k: int = 3,
        j: int = 3,
        r0: float = 1e-5,
        loss_alpha: float = 0.1,
        nu: float = 1e-3,
        gamma_c: int = 1,
        gamma_d: int = 1,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        amsgrad: bool = True,
        pool: int = 3,
        blur_sigma: float = 4.0,
        region_sizes: Sequence[int | None] = (None, None),
        alpha: Sequence[float] = (1.0, 0.0, 0.0),
        loss_weights: Sequence[float] = (1.0, 1.0, 1.0),
        distance_budget_mb: float = 256.0,
        seed: int = 0,
        slic: dict | None = None,
    ) -> None:
        super().__init__()
        region_sizes = [None if r is None else int(r) for r in region_sizes]
        _check_alpha(alpha, region_sizes)
        self.save_hyperparameters(ignore=["backbone"])
        self.model = CFAModel(
            backbone,
            region_sizes=region_sizes,
            alpha=alpha,
            loss_weights=loss_weights,
            k=k,
            j=j,
            r0=r0,
            loss_alpha=loss_alpha,
            nu=nu,
            gamma_d=gamma_d,
            pool=pool,
            blur_sigma=blur_sigma,
            distance_budget_mb=distance_budget_mb,
        )

    # --- superpixel views requested from the datamodule -----------------------------------------
    @property
    def view_region_sizes(self) -> list[int]:
        return [self.model.region_sizes[v] for v in self.model.view_names[1:]]

    def _feats(self, batch: Batch) -> dict[str, torch.Tensor]:
        mosaics = {}
        if len(self.model.view_names) > 1:
            views = batch.extra.get("mosaics")
            if views is None:
                raise TexadError("Sp-CFA needs superpixel mosaics in the batch; the datamodule did not provide them")
            mosaics = {v: views[:, i] for i, v in enumerate(self.model.view_names[1:])}
        return self.model.view_features(batch.image, mosaics)

    # --- fit -----------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.model.banks_built:
            return  # resumed from a checkpoint: the bank is part of it
        dm = self.trainer.datamodule
        rank, world = self.trainer.global_rank, self.trainer.world_size
        loader = dm.fit_statistics_dataloader(rank=rank, world_size=world)
        for batch in tqdm(loader, desc="memory bank", disable=rank != 0, leave=False):
            batch = self.trainer.strategy.batch_to_device(batch, self.device)
            with torch.no_grad():
                self.model.build_bank_step(self._feats(batch))
        self.model.finalize_banks(self.hparams.gamma_c, self.hparams.seed)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, parts = self.model.loss(self._feats(batch))
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(batch))
        for v, p in parts.items():
            self.log(f"train/loss_{v}", p, on_step=False, on_epoch=True, batch_size=len(batch))
        self.log("train/radius", self.model.heads["org"].loss_fn.radius.detach(), on_step=False, on_epoch=True, batch_size=len(batch))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("model.backbone.")]
        return torch.optim.AdamW(
            params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, amsgrad=self.hparams.amsgrad
        )

    # --- inference -----------------------------------------------------------------------------
    def predict_maps(self, batch: Batch) -> dict[str, torch.Tensor]:
        if not self.model.banks_built:
            raise TexadError("CFA has no memory bank: train it first (or load a trained checkpoint)")
        size = tuple(batch.image.shape[-2:])
        views = self.model.view_maps(self._feats(batch), size, batch.superpixels)
        amap = self.model.fuse(views)
        out: dict[str, Any] = {"anomaly_map": amap, "pred_score": amap.flatten(1).amax(1)}
        out["view_maps"] = views
        return out
