"""Image-level anomaly metrics (AUROC, best F1) accumulated over batches, exact and sigmoid-free."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from texad.errors import TexadError
from texad.metrics.functional import f1_at_threshold, image_scores


class ImageMetrics(Metric):
    """Exact image AUROC and best F1 of per-image anomaly scores (any range).

    ``compute()`` returns python floats under ``image_auroc``, ``image_f1`` and
    ``image_f1_threshold`` (predict anomalous when ``score >= threshold``); nan where undefined.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, pred_score: torch.Tensor, label: torch.Tensor) -> None:
        """Store one batch: scores (B,) and 0/1 labels (B,)."""
        pred_score, label = pred_score.reshape(-1), label.reshape(-1)
        if pred_score.numel() != label.numel():
            raise TexadError(f"got {pred_score.numel()} scores but {label.numel()} labels")
        self.scores.append(pred_score.detach().to("cpu", torch.float64))
        binary = label if label.dtype == torch.bool else label > 0.5
        self.labels.append(binary.detach().to("cpu"))

    def compute(self) -> dict[str, float]:
        if isinstance(self.scores, list) and not self.scores:
            nan = float("nan")
            return {"image_auroc": nan, "image_f1": nan, "image_f1_threshold": nan}
        return image_scores(dim_zero_cat(self.scores).cpu(), dim_zero_cat(self.labels).cpu())

    def f1_at(self, threshold: float) -> float:
        """Image F1 at a given threshold (``score >= threshold``), e.g. the one chosen on validation."""
        if isinstance(self.scores, list) and not self.scores:
            return float("nan")
        return f1_at_threshold(dim_zero_cat(self.scores), dim_zero_cat(self.labels), threshold)
