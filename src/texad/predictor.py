"""Anomaly maps for a folder of new images (the job behind predict.py).

The model is rebuilt from the checkpoint's saved config. Images of any size are resized to the
model's input size; maps are resampled back to each image's own size with `texad.geometry.resample`
(the model's pixels seen through the resize, bilinear at the original pixels' centres), and masks
thresholded there. Written to the run dir (outputs/predict/<date>/<time> unless hydra.run.dir says otherwise):

    maps/<name>.npz        float16 anomaly map at the original size, with the image score
    masks/<name>.png       0/255 binary mask: map >= threshold
    overlays/<name>.png    input | predicted mask | heat map with colour bar (first `max_overlays`)
    scores.csv             one row per image: score, verdict, anomalous-pixel fraction, output files
    skipped.txt            files that could not be read, with the reason (empty when none)
    prediction.json        checkpoint, thresholds used and where they came from, counts

Threshold (pixel): `threshold=` if given, else the checkpoint's stored one, else the training run's
validation F1-optimal threshold (`val.pixel_f1_threshold` in <run>/metrics.json next to the
checkpoint). Never the test set's. Without any, masks are not written (maps and scores still are).

Long inputs: images are read, scored and written `batch_size` at a time (memory does not grow with
the folder; each image's row in scores.csv is a few numbers), a progress bar counts them, and an
interrupted predict run again with the same hydra.run.dir skips every image whose outputs are
already written (their score is read back from the map file).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from texad.data.batch import collate
from texad.data.images import as_hw, read_rgb, resize_rgb, to_tensor
from texad.data.layout import IMAGE_SUFFIXES
from texad.errors import TexadError
from texad.geometry import PIXELS, resample
from texad.outputs import atomic_write, read_json, write_json
from texad.pipeline import build, checkpoint_file, load_checkpoint_config
from texad.writers import save_map, write_csv

log = logging.getLogger(__name__)


def list_inputs(input_dir: Path, recursive: bool) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(image files by suffix, other files with the reason they are skipped), sorted."""
    if not input_dir.is_dir():
        raise TexadError(f"input_dir {str(input_dir)!r} is not a directory")
    files = sorted(p for p in (input_dir.rglob("*") if recursive else input_dir.iterdir()) if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [(p, f"not an image file (suffix {p.suffix or 'none'!r}; known: {', '.join(IMAGE_SUFFIXES)})") for p in files if p not in images]
    return images, others


def find_thresholds(cfg: DictConfig, checkpoint: dict, ckpt_file: Path) -> dict[str, Any]:
    """Pixel and image thresholds: given > stored in the checkpoint > the run's validation F1 optimum."""
    stored = checkpoint.get("texad_thresholds") or {}
    metrics_file = ckpt_file.resolve().parent.parent / "metrics.json"
    val = (read_json(metrics_file).get("val") or {}) if metrics_file.is_file() else {}
    out: dict[str, Any] = {}
    for kind, given in (("pixel", cfg.get("threshold")), ("image", cfg.get("image_threshold"))):
        if given is not None:
            value, source = float(given), "given"
        elif stored.get(kind) is not None:
            value, source = float(stored[kind]), "checkpoint"
        elif val.get(f"{kind}_f1_threshold") is not None:
            value, source = float(val[f"{kind}_f1_threshold"]), f"validation F1 optimum ({metrics_file})"
        else:
            value, source = None, "none available: pass threshold=<value>" if kind == "pixel" else "none available"
        out[kind], out[f"{kind}_source"] = value, source
    return out


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def output_name(path: Path, input_dir: Path) -> Path:
    """The input's path under input_dir without its suffix: outputs keep the inputs' names."""
    return path.relative_to(input_dir).with_suffix("")


class Predictor:
    """A checkpoint's model with its input size and normalisation, scoring uint8 RGB images."""

    def __init__(self, cfg: DictConfig) -> None:
        self.ckpt_file = checkpoint_file(cfg.ckpt_path)  # a run dir: the model it tested
        checkpoint, saved = load_checkpoint_config(self.ckpt_file)
        run_cfg = OmegaConf.create(saved)
        run_cfg["paths"] = cfg.paths
        run_cfg["feature_cache"] = cfg.get("feature_cache")
        datamodule, method = build(run_cfg)
        method.load_method_state(checkpoint["state_dict"])
        self.device = pick_device(str(cfg.get("device", "auto")))
        self.method = method.to(self.device).eval()
        self.views = getattr(datamodule, "views", None)
        self.size = as_hw(run_cfg.dataset.image_size)
        self.mean, self.std = tuple(run_cfg.dataset.mean), tuple(run_cfg.dataset.std)
        self.checkpoint = checkpoint

    def item(self, image: np.ndarray, path: Path) -> dict[str, Any]:
        small = resize_rgb(image, self.size)
        item = {"image": to_tensor(small, self.mean, self.std), "label": -1, "path": str(path), "defect_type": "unknown", "mask": None}
        if self.views is not None:
            item.update(self.views(small, str(path), self.mean, self.std))
        return item

    @torch.inference_mode()
    def __call__(self, items: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        batch = collate(items)
        batch.image = batch.image.to(self.device)
        batch.extra = {k: v.to(self.device) for k, v in batch.extra.items()}
        if batch.superpixels is not None:
            batch.superpixels = batch.superpixels.to(self.device)
        out = self.method.predict_maps(batch)
        # the image score under the rule the run chose on validation (its threshold belongs to that rule)
        out["pred_score"] = self.method.image_rule_step("predict", out["anomaly_map"], out["pred_score"], None)
        return out["anomaly_map"].float().cpu().numpy(), out["pred_score"].float().cpu().reshape(-1).numpy()


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def predict(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.paths.output_dir)
    input_dir = Path(str(cfg.input_dir)).expanduser().resolve()
    images, skipped = list_inputs(input_dir, bool(cfg.get("recursive", True)))
    if not images and not skipped:
        raise TexadError(f"input_dir {str(input_dir)!r} holds no files")
    predictor = Predictor(cfg)
    thresholds = find_thresholds(cfg, predictor.checkpoint, predictor.ckpt_file)
    pixel_t, image_t = thresholds["pixel"], thresholds["image"]
    if pixel_t is None:
        log.warning("no pixel threshold (%s): masks are not written", thresholds["pixel_source"])
    rows: list[dict[str, Any]] = []
    value_range = [np.inf, -np.inf]
    batch_size = int(cfg.get("batch_size", 8))
    todo = []
    for path in images:  # an interrupted run's finished images: read back, not predicted again
        row = finished_row(path, input_dir, out_dir, pixel_t, image_t, value_range)
        if row is None:
            todo.append(path)
        else:
            rows.append(row)
    if rows:
        log.info("resuming: %d of %d images already predicted in %s", len(rows), len(images), out_dir)
    bar = tqdm(total=len(images), initial=len(rows), desc="predict", unit="img")
    for start in range(0, len(todo), batch_size):
        items, metas = [], []
        for path in todo[start : start + batch_size]:
            try:
                image = read_rgb(path)
            except TexadError as err:
                skipped.append((path, str(err)))
                continue
            items.append(predictor.item(image, path))
            metas.append((path, image.shape[:2]))
        if items:
            maps, scores = predictor(items)
            for (path, (h, w)), amap, score in zip(metas, maps, scores):
                full = to_image_size(amap, (h, w))
                name = output_name(path, input_dir)
                if pixel_t is not None:  # the mask first: a map file marks the image as done
                    atomic_write(out_dir / "masks" / f"{name}.png", lambda tmp, m=full >= pixel_t: _write_png(tmp, m))
                save_map(out_dir / "maps" / f"{name}.npz", full, pred_score=float(score))
                rows.append(make_row(path, input_dir, name, (h, w), float(score), full, pixel_t, image_t))
                value_range[:] = [min(value_range[0], float(full.min())), max(value_range[1], float(full.max()))]
        bar.update(len(todo[start : start + batch_size]))
    bar.close()
    order = {str(p.relative_to(input_dir)): i for i, p in enumerate(images)}
    rows.sort(key=lambda r: order[r["path"]])
    columns = ["path", "width", "height", "pred_score", "anomalous", "anomalous_pixel_fraction", "map", "mask", "overlay"]
    n_overlays = write_overlays(cfg, rows, input_dir, out_dir, thresholds, (value_range[0], value_range[1]))
    write_csv(out_dir / "scores.csv", rows, [c for c in columns if any(c in r for r in rows)])
    buf = io.StringIO()
    csv.writer(buf, delimiter="\t", lineterminator="\n").writerows((str(p), reason) for p, reason in skipped)
    write_text(out_dir / "skipped.txt", buf.getvalue())
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    record = {
        "ckpt_path": str(predictor.ckpt_file), "input_dir": str(input_dir), "n_images": len(rows), "n_skipped": len(skipped),
        "n_overlays": n_overlays, **thresholds,
    }
    write_json(out_dir / "prediction.json", record)
    log.info("predicted %d images (%d skipped) into %s", len(rows), len(skipped), out_dir)
    if not rows:
        raise TexadError(f"no readable image in {str(input_dir)!r}; see {out_dir / 'skipped.txt'}")
    return record


def to_image_size(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map on the model's input pixels → the original image's pixels (`texad.geometry.resample`): the
    model's pixel grid seen through the resize, sampled bilinearly at the original pixels' centres."""
    if amap.shape == tuple(size):
        return amap
    source = PIXELS.through_resize(amap.shape[-2:], size)
    return resample(torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32)), source, size).numpy()


def make_row(path: Path, input_dir: Path, name: Path, hw: tuple[int, int], score: float, full: np.ndarray,
             pixel_t: float | None, image_t: float | None) -> dict[str, Any]:
    """One image's line of scores.csv."""
    row: dict[str, Any] = {"path": str(path.relative_to(input_dir)), "width": hw[1], "height": hw[0],
                           "pred_score": score, "map": f"maps/{name}.npz"}
    if image_t is not None:
        row["anomalous"] = int(score >= image_t)
    if pixel_t is not None:
        row["anomalous_pixel_fraction"] = float((full >= pixel_t).mean())
        row["mask"] = f"masks/{name}.png"
    return row


def finished_row(path: Path, input_dir: Path, out_dir: Path, pixel_t: float | None, image_t: float | None,
                 value_range: list[float]) -> dict[str, Any] | None:
    """The row of an image an earlier (interrupted) run in this run dir finished, else None."""
    name = output_name(path, input_dir)
    map_path = out_dir / "maps" / f"{name}.npz"
    if not map_path.is_file() or (pixel_t is not None and not (out_dir / "masks" / f"{name}.png").is_file()):
        return None
    try:
        with np.load(map_path) as stored:
            full, score = stored["anomaly_map"].astype(np.float32), float(stored["pred_score"])
    except (OSError, ValueError, KeyError, EOFError):
        return None  # unreadable: predicted again
    value_range[:] = [min(value_range[0], float(full.min())), max(value_range[1], float(full.max()))]
    row = make_row(path, input_dir, name, full.shape, score, full, pixel_t, image_t)
    if pixel_t is not None:  # the mask as written (from the float32 map), not the float16 copy
        mask = cv2.imread(str(out_dir / "masks" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        if mask is None or mask.shape != full.shape:
            return None
        row["anomalous_pixel_fraction"] = float((mask > 0).mean())
    return row


def _write_png(tmp: Path, mask: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise TexadError(f"cannot encode mask {tmp}")
    tmp.write_bytes(data.tobytes())


def write_overlays(cfg, rows, input_dir: Path, out_dir: Path, thresholds: dict, value_range) -> int:
    """Second pass, so every overlay shares the colour scale of the whole folder."""
    from texad.viz import overlay_figure, save_figure

    limit = cfg.get("max_overlays")
    chosen = rows if limit is None else rows[: int(limit)]
    pixel_t, image_t = thresholds["pixel"], thresholds["image"]
    for row in tqdm(chosen, desc="overlays", unit="img", disable=len(chosen) < 8):
        image = read_rgb(input_dir / row["path"])
        amap = np.load(out_dir / row["map"])["anomaly_map"].astype(np.float32)
        verdict = "" if image_t is None else ("  → anomalous" if row["anomalous"] else "  → normal") + f" (image threshold {image_t:.4g})"
        fig = overlay_figure(
            image, amap, score=row["pred_score"], title=row["path"], mask=None if pixel_t is None else amap >= pixel_t,
            mask_name="predicted mask", threshold=pixel_t, threshold_name="pixel threshold", value_range=value_range,
            subtitle=f"unlabelled{verdict}",
        )
        name = Path(row["map"]).relative_to("maps").with_suffix(".png")
        save_figure(fig, out_dir / "overlays" / name)
        row["overlay"] = f"overlays/{name}"
    return len(chosen)


