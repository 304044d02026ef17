"""Pixel-level anomaly metrics accumulated over batches (AUROC, AUPRO, AP, best F1).

Why not torchmetrics' BinaryAUROC & co.: they pass scores outside [0, 1] through a
sigmoid batch by batch, which silently changes the ranking of unbounded anomaly maps,
and their binned variants are approximate.  Here the maps are stored (float32, CPU)
and ranked exactly once in ``compute``.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from texad.errors import TexadError
from texad.metrics.aupimo import DEFAULT_FPR_BOUNDS, aupimo_per_image
from texad.metrics.functional import f1_at_threshold, pixel_scores

# Output key suffix -> key of ``pixel_scores`` ("aupr" is the average precision).
_KEYS_FROM = {"auroc": "auroc", "aupro": "aupro", "aupr": "ap", "f1": "f1", "f1_threshold": "f1_threshold"}
_KEYS = tuple(f"pixel_{name}" for name in _KEYS_FROM)


def pixel_metric_record(maps, masks, fpr_limit: float = 0.3) -> dict[str, float]:
    """`pixel_scores` under the metrics.json keys (pixel_auroc, pixel_aupro, pixel_aupr, pixel_f1, …)."""
    scores = pixel_scores(maps, masks, fpr_limit)
    return {f"pixel_{name}": scores[source] for name, source in _KEYS_FROM.items()}


def _drop_channel(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise TexadError(f"{name} must be (B, H, W) or (B, 1, H, W), got shape {tuple(x.shape)}")
    return x


class PixelMetrics(Metric):
    """Exact pixel AUROC, AUPRO (up to ``fpr_limit``), AP and best F1 over all updates.

    ``compute()`` returns python floats under ``pixel_auroc``, ``pixel_aupro``,
    ``pixel_aupr`` (average precision), ``pixel_f1`` and ``pixel_f1_threshold``;
    nan where undefined (e.g. no anomalous pixel seen).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, fpr_limit: float = 0.3, aupimo_fpr_bounds=DEFAULT_FPR_BOUNDS, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < fpr_limit <= 1.0:
            raise TexadError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        self.fpr_limit = fpr_limit
        self.add_state("anomaly_maps", default=[], dist_reduce_fx="cat")
        self.add_state("masks", default=[], dist_reduce_fx="cat")
        self.aupimo_fpr_bounds = tuple(aupimo_fpr_bounds)
        self.per_image: dict = {}  # after compute(): per-image values in update order (pixel_aupimo)

    def update(self, anomaly_map: torch.Tensor, mask: torch.Tensor) -> None:
        """Store one batch: maps (B, H, W) or (B, 1, H, W) of any range; masks 0/1 or bool."""
        anomaly_map = _drop_channel(anomaly_map, "anomaly_map")
        mask = _drop_channel(mask, "mask")
        if anomaly_map.shape != mask.shape:
            raise TexadError(
                f"anomaly_map {tuple(anomaly_map.shape)} and mask {tuple(mask.shape)} differ; "
                "resize the map to the mask first"
            )
        self.anomaly_maps.append(anomaly_map.detach().to("cpu", torch.float32))
        binary = mask if mask.dtype == torch.bool else mask > 0.5
        self.masks.append(binary.detach().to("cpu"))

    def compute(self) -> dict[str, float]:
        if isinstance(self.anomaly_maps, list) and not self.anomaly_maps:
            self.per_image = {}
            return dict.fromkeys((*_KEYS, "pixel_aupimo"), float("nan"))
        maps = dim_zero_cat(self.anomaly_maps).cpu()
        masks = dim_zero_cat(self.masks).cpu()
        record = pixel_metric_record(maps, masks, self.fpr_limit)
        per_image = aupimo_per_image(maps, masks, self.aupimo_fpr_bounds)  # nan for normal images
        self.per_image = {"pixel_aupimo": per_image}
        finite = per_image[per_image == per_image]
        record["pixel_aupimo"] = float(finite.mean()) if finite.size else float("nan")
        return record

    def f1_at(self, threshold: float) -> float:
        """Pixel F1 of the stored maps at a given threshold (``map >= threshold``), e.g. validation's."""
        if isinstance(self.anomaly_maps, list) and not self.anomaly_maps:
            return float("nan")
        return f1_at_threshold(dim_zero_cat(self.anomaly_maps).flatten(), dim_zero_cat(self.masks).flatten(), threshold)
