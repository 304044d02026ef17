"""What every texad LightningModule shares: the output contract, metrics and checkpoint hygiene.

Subclasses implement `predict_maps(batch) -> dict` with at least `anomaly_map` (B,H,W, higher = more
anomalous) and `pred_score` (B,). Validation and test then update the same torchmetrics metrics.

The contract a method meets (docs/adding-a-method.md): `predict_maps`; optionally `prepare_fit` /
`finish_fit` around the fit, `describe_run` / `attach_views` / `refuse` for the pipeline. `Localizer`
is what another method needs of one used as its source of maps (defect-type clustering): `fit_on` a
datamodule, then `predict_maps`; every AnomalyModule meets it through its own Lightning hooks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import lightning as L
import torch
from torchmetrics.utilities import dim_zero_cat

from texad.data.batch import Batch
from texad.errors import TexadError
from texad.metrics import ImageMetrics, PixelMetrics
from texad.metrics.bootstrap import TestStatistics, collect_statistics, intervals
from texad.metrics.border import ratio_of_sums, ring_sums
from texad.metrics.functional import roc_auc
from texad.metrics.offset import defect_alignment, offset_record
from texad.methods.components.image_rule import IMAGE_SCORER, ImageRuleMixin  # the image-score rule

BACKBONE_PREFIX = "model.backbone."


def auroc_per_type(scored: list[tuple[float, str]], normal: str = "good") -> dict[str, float]:
    """Image AUROC of the normal images against each defect type alone (which defects a method misses)."""
    good = [s for s, t in scored if t == normal]
    types = sorted({t for _, t in scored if t != normal})
    if not good or not types:
        return {}
    out = {}
    for kind in types:
        bad = [s for s, t in scored if t == kind]
        out[kind] = roc_auc(torch.tensor(good + bad, dtype=torch.float64), torch.tensor([0] * len(good) + [1] * len(bad)))
    return out


@runtime_checkable
class Localizer(Protocol):
    """A method consumed as a source of anomaly maps: fit on a datamodule's training images, then maps for a batch."""

    def fit_on(self, datamodule: L.LightningDataModule) -> dict[str, Any]:
        """Fit on `datamodule.train_dataloader()` (and `fit_statistics_dataloader()`) as train.py would; return
        what to record (images, epochs, first and last epoch's mean training loss)."""
        ...

    def predict_maps(self, batch: Batch) -> dict[str, torch.Tensor]:
        """`anomaly_map` (B, H, W) and `pred_score` (B,) for a batch."""
        ...


class _EpochLosses(L.Callback):
    """Mean `train/loss` of each epoch, as the method logs it."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.losses.append(float(loss))


class AnomalyModule(ImageRuleMixin, L.LightningModule):
    """Base LightningModule: evaluation loop, metrics, checkpoints without frozen backbone weights."""

    #: does `train.py` run a fit for this method (False for zero-shot methods)
    needs_fit: bool = True
    #: may the pipeline pick this method's epoch on validation (False where validation metrics do not
    #: judge what the epochs train, e.g. the clustering head)
    selects_epochs: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.strict_loading = False  # frozen backbone weights are not stored in checkpoints
        self.texad_config: dict | None = None  # the resolved run config, stored in checkpoints only
        self.output_dir: Path | None = None  # the run dir, for figures a method writes itself (set by the pipeline)
        self.metrics = torch.nn.ModuleDict(
            {
                "val_pixel": PixelMetrics(),
                "val_image": ImageMetrics(),
                "test_pixel": PixelMetrics(),
                "test_image": ImageMetrics(),
            }
        )
        self.results: dict[str, dict[str, Any]] = {}
        self.per_image_results: dict[str, dict[str, Any]] = {}  # stage → key → (N,) array
        self._ring: dict[str, torch.Tensor] = {}  # stage → accumulated ring_sums of normal images
        self._typed_scores: dict[str, list[tuple[float, str]]] = {}  # stage → (image score, defect type)
        self._alignment: dict[str, torch.Tensor] = {}  # stage → summed map/mask alignment scores (map_offset)
        self._test_items: list[tuple[str, str]] = []  # (path, defect type) of the test images in update order
        self.test_statistics: TestStatistics | None = None  # after a test pass: per-image bootstrap statistics
        self._init_image_rule()  # image_scorer, the rule chosen on validation (texad.methods.components.image_rule)

    # --- hooks around fitting (e.g. Sp-CFA's cache of trained views) -----------------------------
    # They get the datamodule only: what a method needs from the run (cache dir, output dir, the run's
    # description for cache keys) comes as named arguments of `attach_views`, never the run config.
    def prepare_fit(self, datamodule: L.LightningDataModule) -> bool:
        """Called before fit; return False when nothing needs fitting (zero-shot, or all cached)."""
        return self.needs_fit

    def finish_fit(self, datamodule: L.LightningDataModule) -> None:
        """Called after fit on rank 0 (e.g. to store trained parts in a cache)."""

    # --- hooks the pipeline calls on every method (defaults: nothing to do) ---------------------
    @staticmethod
    def describe_run(run_config: Mapping[str, Any]) -> dict[str, Any]:
        """What of the run (the resolved config, a plain mapping) decides the parts this method caches
        across runs; handed back to `attach_views` as `run_description`, used only for cache keys."""
        return {}

    def attach_views(
        self, datamodule: L.LightningDataModule, *, cache_dir: str | Path, output_dir: Path | None,
        run_description: dict[str, Any],
    ) -> None:
        """Called once after building: give the datamodule what the method needs in its batches (e.g.
        Sp-CFA's superpixel mosaics) and tell the method its cache dir and run dir."""

    def refuse(self, results: dict[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        """evaluate.py's `fusion.search`: re-choose the fusion of per-view maps on validation after an
        evaluation, replace `results["val"]` / `results["test"]` by the metrics at that choice and return
        a record of it for metrics.json. Only methods with several fused views implement it."""
        raise TexadError(f"fusion.search needs a method that keeps per-view maps (cfa / spcfa), "
                         f"not {type(self).__name__}")

    # --- as another method's localiser (`Localizer`) -----------------------------------------
    def fit_on(self, datamodule: L.LightningDataModule) -> dict[str, Any]:
        """Fit with this method's own hooks (`prepare_fit`, `on_fit_start`, `training_step`, `on_fit_end`,
        `finish_fit`) under a bare one-device trainer: `epochs` passes or a `max_steps` budget from the
        method's keys, no validation, checkpoints or loggers. For a method that uses this one's maps."""
        if not self.prepare_fit(datamodule):
            return {}
        datamodule.setup("fit")
        epochs = int(self.hparams.get("epochs") or 0)
        max_steps = int(self.hparams.get("max_steps") or -1)
        losses = _EpochLosses()
        trainer = L.Trainer(
            accelerator="cpu" if self.device.type == "cpu" else self.device.type, devices=1,
            max_epochs=epochs, max_steps=max_steps, limit_val_batches=0, num_sanity_val_steps=0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[losses],
        )
        trainer.fit(self, datamodule=datamodule)
        self.finish_fit(datamodule)
        self.trainer = None  # the fit is over: the method does not answer to that trainer's state
        images = len(getattr(datamodule, "train_samples", None) or trainer.train_dataloader.dataset)
        return {"localizer_images": images, "localizer_epochs": len(losses.losses),
                "localizer_loss_first_epoch": losses.losses[0] if losses.losses else None,
                "localizer_loss_last_epoch": losses.losses[-1] if losses.losses else None}

    # --- the method contract -------------------------------------------------------------------
    def predict_maps(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- evaluation ----------------------------------------------------------------------------
    def _eval_step(self, batch: Batch, stage: str) -> dict[str, Any]:
        out = self.predict_maps(batch)
        # the run's image-score rule (validation keeps the maps and chooses it at its end)
        out["pred_score"] = self.image_rule_step(stage, out["anomaly_map"], out["pred_score"], batch.label,
                                                 batch.defect_type)
        amap, score = out["anomaly_map"].float(), out["pred_score"].float()
        if batch.mask is not None:
            self.metrics[f"{stage}_pixel"].update(amap.cpu(), batch.mask[:, 0].cpu())
            aligned = defect_alignment(amap.cpu(), batch.mask[:, 0].cpu())
            self._alignment[stage] = aligned + self._alignment[stage] if stage in self._alignment else aligned
        if (batch.label >= 0).all():
            self.metrics[f"{stage}_image"].update(score.cpu(), batch.label.cpu())
            self._typed_scores.setdefault(stage, []).extend(zip(score.cpu().tolist(), batch.defect_type))
            if stage == "test":
                self._test_items.extend(zip(batch.path, batch.defect_type))
            normal = batch.label.cpu() == 0
            if normal.any() and min(amap.shape[-2:]) > 2:
                sums = ring_sums(amap.cpu()[normal])
                self._ring[stage] = sums if stage not in self._ring else self._ring[stage] + sums
        return {**out, "path": batch.path, "label": batch.label, "defect_type": batch.defect_type}

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        out = self.predict_maps(batch)
        out["pred_score"] = self.image_rule_step("predict", out["anomaly_map"], out["pred_score"], None)
        return {**out, "path": batch.path}

    def _compute(self, stage: str) -> None:
        self.image_rule_select(stage)  # choose the rule, redo validation's image metrics with it
        res: dict[str, Any] = {"image_score": self.image_rule_record(stage)}
        chosen = self.results.get("val", {}) if stage == "test" else {}
        for kind in ("pixel", "image"):
            metric = self.metrics[f"{stage}_{kind}"]
            values = metric.compute() if metric.update_count > 0 else {}
            # F1 at the threshold validation chose (its best-F1 threshold), beside test's own best F1
            threshold = chosen.get(f"{kind}_f1_threshold")
            if stage == "test" and threshold is not None and metric.update_count > 0:
                values[f"{kind}_f1_at_val"] = metric.f1_at(threshold)
            if kind == "pixel":  # per-image values (pixel_aupimo) in update order, for scores.csv
                self.per_image_results[stage] = dict(getattr(metric, "per_image", {}) or {})
            for key in (
                ("pixel_auroc", "pixel_aupro", "pixel_aupr", "pixel_f1", "pixel_f1_threshold", "pixel_f1_at_val",
                 "pixel_aupimo")
                if kind == "pixel"
                else ("image_auroc", "image_f1", "image_f1_threshold", "image_f1_at_val")
            ):
                if stage != "test" and key.endswith("_at_val"):
                    continue
                v = values.get(key)
                res[key] = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
        ring = self._ring.pop(stage, None)
        res["ring_ratio"] = None if ring is None else ratio_of_sums(ring)
        res.update(offset_record(self._alignment.pop(stage, None)))
        per_type = auroc_per_type(self._typed_scores.pop(stage, []))
        if per_type:
            res["image_auroc_per_type"] = per_type
        if stage == "test":
            self.test_statistics = self._test_statistics(chosen)
            if self.test_statistics is not None:
                res["ci95"] = intervals(self.test_statistics)
        self._test_items = []
        for kind in ("pixel", "image"):
            self.metrics[f"{stage}_{kind}"].reset()
        self.results[stage] = res
        for key, v in res.items():
            if isinstance(v, float):
                # every rank logs (the metric states are synced in compute, so the values agree):
                # callbacks that monitor a validation metric run on every rank
                self.log(f"{stage}/{key}", v, sync_dist=False)
        for key, bounds in (res.get("ci95") or {}).items():
            if isinstance(bounds, list):
                self.log(f"{stage}/{key}_ci_low", bounds[0], sync_dist=False)
                self.log(f"{stage}/{key}_ci_high", bounds[1], sync_dist=False)

    def _test_statistics(self, chosen: dict[str, Any]) -> TestStatistics | None:
        """Per-image statistics of the test pass for the bootstrap intervals (None without image labels)."""
        image, pixel = self.metrics["test_image"], self.metrics["test_pixel"]
        if image.update_count == 0 or len(self._test_items) != int(dim_zero_cat(image.scores).numel()):
            return None
        paths, types = zip(*self._test_items)
        maps = masks = None
        if pixel.update_count > 0:
            maps, masks = dim_zero_cat(pixel.anomaly_maps), dim_zero_cat(pixel.masks)
        return collect_statistics(
            dim_zero_cat(image.scores), dim_zero_cat(image.labels).long(), paths, types, maps, masks,
            aupimo=pixel.per_image.get("pixel_aupimo") if maps is not None else None,
            thresholds={"pixel": chosen.get("pixel_f1_threshold"), "image": chosen.get("image_f1_threshold")},
        )

    def on_validation_epoch_end(self) -> None:
        self._compute("val")

    def on_test_epoch_end(self) -> None:
        self._compute("test")

    # --- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(BACKBONE_PREFIX)
        }
        checkpoint["texad_config"] = self.texad_config

    def load_method_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a texad checkpoint's state: everything but the frozen backbone must be present."""
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.startswith(BACKBONE_PREFIX) and not k.startswith("metrics.")
                   and not k.startswith(IMAGE_SCORER + ".")]  # older checkpoints have no image_scorer
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
