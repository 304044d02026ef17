"""What methods fitted by statistics alone (PatchCore's memory bank, PaDiM's Gaussians) share.

They take no gradient step: `train.py` still runs `trainer.fit` (so DDP, checkpoints, resume and
loggers behave as for every method), the statistics are computed once in `on_fit_start` from the
training images, and the fit loop is then told to run zero epochs; `method.epochs` is ignored with
a log line. Under DDP every rank reads every world_size-th training image
(`fit_statistics_dataloader`) and `gather_in_image_order` puts the per-image results back in the
order one process would have seen, so the statistics equal a one-process fit.

torch's DistributedDataParallel refuses a module without a trainable parameter, which is exactly
what these methods are; under DDP (only) a placeholder scalar is registered before the wrap. It is
never used, never optimised, and left out of checkpoints.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from texad.errors import TexadError
from texad.methods.base import AnomalyModule

log = logging.getLogger(__name__)

DDP_PLACEHOLDER = "ddp_placeholder"


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_in_image_order(local: torch.Tensor) -> torch.Tensor:
    """Rank r holds images r, r+W, r+2W, … stacked along dim 0; return all images in index order."""
    if not distributed():
        return local
    world = dist.get_world_size()
    count = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    total = sum(counts)
    out = local.new_empty((total, *local.shape[1:]))
    for r, (part, c) in enumerate(zip(parts, counts)):
        out[r::world] = part[:c]
    return out


class StatisticsModule(AnomalyModule):
    """An AnomalyModule whose fit is `build_statistics(loader)`, run once in `on_fit_start`."""

    needs_fit = True
    selects_epochs = False  # no epochs to select: the fit loop runs zero (on_fit_start)

    def __init__(self) -> None:
        super().__init__()
        self.fit_info: dict[str, Any] = {}

    # --- to implement ------------------------------------------------------------------------------
    @property
    def statistics_built(self) -> bool:
        raise NotImplementedError

    def build_statistics(self, batches) -> dict[str, Any]:
        """Consume the iterable of training batches (already on this device); return fit info."""
        raise NotImplementedError

    # --- the fit -------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and not hasattr(self, DDP_PLACEHOLDER):
            self.register_parameter(DDP_PLACEHOLDER, nn.Parameter(torch.zeros(())))

    def _ignore_epochs(self, epochs: Any) -> None:
        name = self.hparams.get("name", type(self).__name__)
        log.info("%s takes no gradient steps: the fit is its statistics of the training images; "
                 "method.epochs=%s is ignored", name, epochs)

    def on_fit_start(self) -> None:
        name = self.hparams.get("name", type(self).__name__)
        if self.trainer.max_epochs:
            self._ignore_epochs(self.trainer.max_epochs)
        self.trainer.fit_loop.max_epochs = 0
        if self.statistics_built:
            return  # resumed from a checkpoint that holds them
        dm = self.trainer.datamodule
        rank, world = self.trainer.global_rank, self.trainer.world_size
        loader = dm.fit_statistics_dataloader(rank=rank, world_size=world)
        strategy = self.trainer.strategy
        batches = (
            strategy.batch_to_device(b, self.device)
            for b in tqdm(loader, desc=f"{name} statistics", disable=rank != 0, leave=False)
        )
        start = time.perf_counter()
        with torch.no_grad():
            info = self.build_statistics(batches)
        self.fit_info["statistics"] = {**info, "fit_s": round(time.perf_counter() - start, 3), "ranks": world}
        log.info("%s fitted: %s", name, self.fit_info["statistics"])
        if distributed():
            dist.barrier()

    def training_step(self, batch: Any, batch_idx: int) -> None:  # pragma: no cover - zero epochs
        raise TexadError(f"{type(self).__name__} takes no training steps (its fit runs zero epochs)")

    def configure_optimizers(self) -> None:
        return None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"].pop(DDP_PLACEHOLDER, None)
