"""Epoch selection on the validation split: score it every n epochs during fit, keep the best.

Why: CFA over-fits small training sets at its official epoch count (30 epochs ranked defective
images below chance on the embedded sets, 2 epochs did far better), and the official code picked
its epoch on the test set. Here the run's `optimized_metric` (a validation metric, by default
`val/pixel_aupr`) is computed every `selection.every_n_epochs` epochs; the best epoch's weights are
kept in `checkpoints/best.ckpt` and restored before the one test pass; `checkpoints/last.ckpt` still
resumes a crashed fit. `metrics.json` records `selected_epoch` and the validation curve.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from texad.errors import TexadError
from texad.outputs import read_torch_file

log = logging.getLogger(__name__)

BEST_CKPT = "best"


class ValidationCurve(Callback):
    """Records every validation metric after each validation during fit (kept across a resume)."""

    def __init__(self) -> None:
        self.curve: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        point: dict[str, float] = {"epoch": trainer.current_epoch + 1}
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val/"):
                point[key] = float(value)
        self.curve = [p for p in self.curve if p["epoch"] != point["epoch"]] + [point]

    def state_dict(self) -> dict[str, Any]:
        return {"curve": list(self.curve)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curve = list(state_dict.get("curve", []))


class EpochSelection:
    """The callbacks and trainer settings of validation-based epoch selection, and its outcome."""

    def __init__(self, every_n_epochs: int, monitor: str, ckpt_dir: Path, patience: int | None = None) -> None:
        if int(every_n_epochs) < 0:
            raise TexadError(f"selection.every_n_epochs must be >= 0 (0 = keep the last epoch), got {every_n_epochs}")
        if not str(monitor).startswith("val/"):
            raise TexadError(f"optimized_metric must be a validation metric ('val/...') to select epochs, got {monitor!r}")
        if patience is not None and int(patience) < 1:
            raise TexadError(f"selection.patience must be >= 1 or null, got {patience}")
        self.every = int(every_n_epochs)
        self.monitor = str(monitor)
        self.curve = ValidationCurve()
        self.best = ModelCheckpoint(
            dirpath=ckpt_dir, filename=BEST_CKPT, monitor=self.monitor, mode="max", save_top_k=1,
            save_last=False, auto_insert_metric_name=False, enable_version_counter=False,
        )
        self.stopper = (
            EarlyStopping(monitor=self.monitor, mode="max", patience=int(patience), check_finite=False)
            if patience is not None
            else None
        )

    @property
    def callbacks(self) -> list[Callback]:
        return [c for c in (self.best, self.curve, self.stopper) if c is not None]

    @property
    def trainer_kwargs(self) -> dict[str, Any]:
        return {"check_val_every_n_epoch": self.every, "limit_val_batches": 1.0, "num_sanity_val_steps": 0}

    def restore_best(self, method: Any) -> dict[str, Any]:
        """Load the selected epoch's weights into `method`; what metrics.json records about it."""
        path = self.best.best_model_path
        info: dict[str, Any] = {"selection": {"monitor": self.monitor, "every_n_epochs": self.every}}
        info["val_curve"] = self.curve.curve
        if not path or not Path(path).is_file():
            raise TexadError(
                f"epoch selection found no best checkpoint in {self.best.dirpath} (did validation run? "
                f"is {self.monitor!r} a metric validation computes?)"
            )

        checkpoint = read_torch_file(Path(path), "best checkpoint", weights_only=False)
        method.load_method_state(checkpoint["state_dict"])
        score = self.best.best_model_score
        info["selected_epoch"] = int(checkpoint["epoch"]) + 1
        info["selection"]["best_value"] = None if score is None or not math.isfinite(float(score)) else float(score)
        log.info("selected epoch %d by %s = %s", info["selected_epoch"], self.monitor, info["selection"]["best_value"])
        return info

