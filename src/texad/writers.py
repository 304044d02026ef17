"""What a test run leaves behind in its run dir, and in its loggers, besides metrics.json.

`TestOutputWriter` is a Lightning callback (hooked through the config key `eval_callbacks`, so
train.py and evaluate.py both write the same files):

    maps/<defect_type>/<stem>.npz      every test image: float16 anomaly map (model resolution),
                                       its image score and label
    scores.csv                         one row per test image: path, defect type, label, score
    overlays/<defect_type>/<stem>.png  input | ground-truth contour | heat map, first N per type
    curves/pr.png, curves/pro.png      pixel PR and PRO curves of the test set, metric in the title

Maps are written per batch and never kept. The curves need the test set's pixels in memory; beyond
`curve_max_pixels` a seeded uniform sample of whole images is kept instead (whole images, so PRO's
regions stay intact) and the figures say so. Overlays share one colour scale over the whole test
set, so they wait for the last batch; only the `max_overlays_per_type` chosen images are held.
Loggers that show images (W&B, TensorBoard) also receive the resolved config, a few overlays and
both curves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import matplotlib.image as mpimg
import numpy as np
from tqdm.auto import tqdm

from texad.backbones import IMAGENET_MEAN, IMAGENET_STD
from texad.data.images import denormalize
from texad.metrics.functional import pixel_operating_points, pixel_scores_from, pro_curve_from
from texad.artifacts import sample_name, save_map, write_csv
from texad.viz import overlay_figure, pr_figure, pro_figure, save_figure

log = logging.getLogger(__name__)

@dataclass
class _OverlayItem:
    name: str
    defect_type: str
    image: np.ndarray  # uint8 (H,W,3)
    anomaly_map: np.ndarray  # float32 (H,W)
    mask: np.ndarray | None
    score: float
    label: int


class _ImageReservoir:
    """A seeded uniform sample of at most `capacity` items from a stream of unknown length."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity, self.items, self.seen = capacity, [], 0
        self.rng = np.random.default_rng(seed)

    def add(self, item: Any) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
            return
        j = int(self.rng.integers(0, self.seen))
        if j < self.capacity:
            self.items[j] = item


class TestOutputWriter(L.Callback):
    """Writes maps, scores, overlays and curves of the test stage under `output_dir`.

    mean/std undo the input normalisation for pictures; None takes them from the datamodule.
    `max_overlays_per_type` (None = all) caps drawn overlays per defect type; maps are always complete.
    `max_logged_overlays` images go to image-capable loggers. `curve_max_pixels` bounds the curves' memory.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        output_dir: str,
        max_overlays_per_type: int | None = 4,
        max_logged_overlays: int = 8,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        curve_max_pixels: int = 50_000_000,
        fpr_limit: float = 0.3,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.output_dir = Path(str(output_dir))
        self.max_overlays_per_type = max_overlays_per_type
        self.max_logged_overlays = max_logged_overlays
        self.mean, self.std = mean, std
        self.curve_max_pixels = int(curve_max_pixels)
        self.fpr_limit = fpr_limit
        self.seed = seed
        self.progress = progress
        self._config_logged = False
        self._reset()

    def _reset(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.overlays: dict[str, list[_OverlayItem]] = {}
        self.curve_data: _ImageReservoir | None = None
        self.value_range = [np.inf, -np.inf]

    # --- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._config_logged and trainer.is_global_zero:
            log_run_config(trainer, pl_module)
            self._config_logged = True

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        dm = getattr(trainer, "datamodule", None)
        self._mean = tuple(self.mean or getattr(dm, "mean", None) or IMAGENET_MEAN)
        self._std = tuple(self.std or getattr(dm, "std", None) or IMAGENET_STD)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.is_global_zero or not isinstance(outputs, dict) or "anomaly_map" not in outputs:
            return
        maps = outputs["anomaly_map"].detach().float().cpu()
        scores = outputs["pred_score"].detach().float().cpu().reshape(-1)
        masks = batch.mask[:, 0].detach().cpu() > 0.5 if batch.mask is not None else None
        for i, path in enumerate(outputs["path"]):
            amap = maps[i].numpy()
            label = int(outputs["label"][i])
            defect_type = str(outputs["defect_type"][i] or "unknown")
            name = sample_name(path)
            score = float(scores[i])
            save_map(self.output_dir / "maps" / defect_type / f"{name}.npz", amap, pred_score=score, label=label)
            self.rows.append({"path": path, "defect_type": defect_type, "label": label, "pred_score": score,
                              "map": f"maps/{defect_type}/{name}.npz"})
            self.value_range = [min(self.value_range[0], float(amap.min())), max(self.value_range[1], float(amap.max()))]
            mask = masks[i].numpy() if masks is not None else None
            if mask is not None:
                self._keep_for_curves(amap, mask)
            chosen = self.overlays.setdefault(defect_type, [])
            if self.max_overlays_per_type is None or len(chosen) < self.max_overlays_per_type:
                image = denormalize(batch.image[i], self._mean, self._std)
                chosen.append(_OverlayItem(name, defect_type, image, amap.copy(), mask, score, label))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.rows:
            return
        columns = ["path", "defect_type", "label", "pred_score", "map"]
        per_image = (getattr(pl_module, "per_image_results", {}) or {}).get("test", {}) or {}
        for key, values in per_image.items():  # e.g. pixel_aupimo (blank for normal images)
            if len(values) == len(self.rows):
                columns.append(key)
                for row, v in zip(self.rows, values):
                    row[key] = "" if v != v else float(v)
        write_csv(self.output_dir / "scores.csv", self.rows, columns)
        val = (getattr(pl_module, "results", {}) or {}).get("val", {}) or {}
        threshold = val.get("pixel_f1_threshold")
        curves = self._write_curves(threshold)
        overlays = self._write_overlays(threshold)
        log_images(trainer, overlays[: self.max_logged_overlays] if self.max_logged_overlays else [], curves)
        self._reset()

    # --- pieces ----------------------------------------------------------------------------------
    def _keep_for_curves(self, amap: np.ndarray, mask: np.ndarray) -> None:
        if self.curve_data is None:
            capacity = max(1, self.curve_max_pixels // max(1, amap.size))
            self.curve_data = _ImageReservoir(capacity, self.seed)
        self.curve_data.add((amap.astype(np.float32, copy=True), mask.copy()))

    def _write_curves(self, threshold: float | None) -> list[tuple[str, Path]]:
        data = self.curve_data
        if data is None or not data.items:
            log.info("no pixel ground truth in the test set: no PR/PRO curves")
            return []
        maps = np.stack([m for m, _ in data.items])
        masks = np.stack([g for _, g in data.items])
        note = "" if data.seen == len(data.items) else f"random sample of {len(data.items)}/{data.seen} images (curve_max_pixels)"
        points, n_regions = pixel_operating_points(maps, masks)  # one sort for the PR and PRO curves
        values = pixel_scores_from(points, n_regions, self.fpr_limit)
        out: list[tuple[str, Path]] = []
        if points.n_pos > 0:
            recall = points.tps / points.n_pos
            precision = points.tps / np.maximum(points.tps + points.fps, 1)
            best = int(np.argmax(2.0 * points.tps / (points.tps + points.fps + points.n_pos)))
            operating = None
            if threshold is not None:
                predicted = maps >= threshold
                tp = int(np.count_nonzero(predicted & masks))
                pos = int(np.count_nonzero(predicted))
                operating = (tp / points.n_pos, tp / pos if pos else 1.0, float(threshold), "val F1 threshold")
            fig = pr_figure(
                precision, recall, ap=values["ap"], prevalence=points.n_pos / (points.n_pos + points.n_neg),
                best=(recall[best], precision[best], values["f1"], values["f1_threshold"]), operating=operating, note=note,
            )
            out.append(("test/pr_curve", save_figure(fig, self.output_dir / "curves" / "pr.png")))
        fpr, pro = pro_curve_from(points, n_regions, fpr_limit=1.0)
        if fpr.size:
            fig = pro_figure(fpr, pro, aupro=values["aupro"], fpr_limit=self.fpr_limit, note=note)
            out.append(("test/pro_curve", save_figure(fig, self.output_dir / "curves" / "pro.png")))
        return out

    def _write_overlays(self, threshold: float | None) -> list[tuple[str, Path]]:
        # round-robin over defect types, so the few logged overlays show every type
        items = [it for row in round_robin(list(self.overlays.values())) for it in row]
        value_range = (self.value_range[0], self.value_range[1])
        written: list[tuple[str, Path]] = []
        for it in tqdm(items, desc="overlays", unit="img", disable=not self.progress or len(items) < 8, leave=False):
            fig = overlay_figure(
                it.image, it.anomaly_map, score=it.score, title=f"{it.defect_type}/{it.name}", label=it.label,
                defect_type=it.defect_type, mask=it.mask, threshold=threshold, threshold_name="val F1 threshold",
                value_range=value_range,
            )
            path = save_figure(fig, self.output_dir / "overlays" / it.defect_type / f"{it.name}.png")
            written.append((f"{it.defect_type}/{it.name} score={it.score:.4g}", path))
        return written


def round_robin(groups: list[list]) -> list[list]:
    """[[a1,a2],[b1]] → [[a1,b1],[a2]]: one of each group per round."""
    rounds = max((len(g) for g in groups), default=0)
    return [[g[r] for g in groups if r < len(g)] for r in range(rounds)]


# --- loggers ---------------------------------------------------------------------------------------


def log_run_config(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """The resolved run config (kept by the pipeline on the method) as the loggers' hyperparameters."""
    config = getattr(pl_module, "texad_config", None)
    if not config:
        return
    for logger in trainer.loggers:
        try:
            logger.log_hyperparams({"config": config})
        except Exception as err:  # a logger that cannot take nested params must not break a run
            log.warning("logger %s did not take the run config: %s", type(logger).__name__, err)


def log_images(trainer: L.Trainer, overlays: list[tuple[str, Path]], curves: list[tuple[str, Path]]) -> None:
    """Overlays and curves to loggers that show images (W&B: log_image; TensorBoard: add_image)."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # WandbLogger and others with the same call
            if overlays:
                logger.log_image("test/overlays", [str(p) for _, p in overlays], caption=[c for c, _ in overlays])
            for key, path in curves:
                logger.log_image(key, [str(path)])
        elif hasattr(getattr(logger, "experiment", None), "add_image"):
            for key, path in [*(("test/overlays/" + c, p) for c, p in overlays), *curves]:
                logger.experiment.add_image(key.split(" ")[0], _read_png(path), dataformats="HWC")


def _read_png(path: Path) -> np.ndarray:
    rgba = mpimg.imread(str(path))
    rgb = rgba[..., :3]
    return (rgb * 255).round().astype(np.uint8) if rgb.dtype != np.uint8 else rgb


__all__ = ["TestOutputWriter", "save_map", "write_csv", "sample_name", "log_run_config", "log_images"]
