"""Resume that resumes: `checkpoints/last.ckpt` at the end of every epoch, holding all a fit needs to go on.

Why: Lightning restores the model, optimiser, loop counters and callback states (epoch selection,
early stopping, the validation curve), but not the random number generators. A resumed run then draws
other random numbers than the uninterrupted one (the blind VAE's vectors, dropout, DataLoader worker
seeds) and its metrics drift. `ResumeCheckpoint` adds to every checkpoint it writes the global RNG
states (python, numpy, torch, CUDA) and the state of every `torch.Generator` the method holds as an
attribute (e.g. the blind VAE's `_sampler`), and puts them back just before the first resumed epoch,
after `on_fit_start` has rebuilt what a method recomputes at each start (memory banks, cached
features). The training order needs nothing: `EpochSeededShuffle` is seeded by (seed, epoch).

When: at the end of every training epoch, after its validation, epoch selection and early stopping,
as the next epoch starts (Lightning resumes a checkpoint written in on_train_epoch_end as a partial
epoch: the next epoch would run one batch and a different sampler epoch), and after the fit (pipeline). Written atomically by Lightning (a temp file moved
into place), so SIGKILL at any moment leaves the previous epoch's last.ckpt intact. On SIGINT
(Ctrl-C) or SIGTERM the fit stops at once and last.ckpt is left at the last completed epoch: a
checkpoint from the middle of an epoch cannot be resumed exactly with a map-style DataLoader (Lightning
restarts the epoch's loader), so it is not written; the log line says which epoch last.ckpt holds.
The same run dir (`hydra.run.dir=<run>`) resumes from it (`texad.pipeline.resume_checkpoint`).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

log = logging.getLogger(__name__)

STATE_KEY = "texad_resume"


def rng_states() -> dict[str, Any]:
    """The global random number generators' states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # plain types and tensors only: Lightning loads checkpoints with torch.load(weights_only=True)
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def module_generators(module: torch.nn.Module) -> dict[str, torch.Generator]:
    """The `torch.Generator`s a method holds as attributes (its own random streams), by attribute name."""
    return {name: value for name, value in vars(module).items() if isinstance(value, torch.Generator)}


class ResumeCheckpoint(Checkpoint):
    """Writes `path` (last.ckpt) after every training epoch, with the RNG states; restores them on resume."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._pending: dict[str, Any] | None = None
        self._at_epoch_start = False  # set while on_train_epoch_start writes
        self.epochs_saved = 0  # epoch count held by the last last.ckpt this process wrote (or resumed from)

    @property
    def state_key(self) -> str:
        return "texad.ResumeCheckpoint"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The end of the previous epoch, seen from the start of the next: written here, Lightning resumes
        by running this epoch whole (a checkpoint from on_train_epoch_end resumes as a partial epoch)."""
        if trainer.current_epoch == 0 or trainer.current_epoch == self.epochs_saved:
            return  # nothing done yet, or just resumed from exactly this state
        # every rank calls save_checkpoint (a collective under DDP); rank 0 writes, atomically
        self._at_epoch_start = True
        try:
            trainer.save_checkpoint(self.path)
        finally:
            self._at_epoch_start = False
        self.epochs_saved = trainer.current_epoch

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[STATE_KEY] = {
            "rng": rng_states(),
            "generators": {name: g.get_state() for name, g in module_generators(pl_module).items()},
            "should_stop": bool(trainer.should_stop),
        }
        if self._at_epoch_start:
            # the epoch loop resets its per-epoch batch counters only once the epoch's first batch is drawn;
            # stored stale, a resumed iteration-based fit (max_steps) would take them for a finished epoch
            # and run one batch of it
            loop = checkpoint.get("loops", {}).get("fit_loop", {})
            progress = loop.get("epoch_loop.batch_progress")
            if progress is not None:
                progress["current"] = {key: 0 for key in progress["current"]}
                progress["is_last_batch"] = False

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(STATE_KEY)
        # written at the start of an epoch (or after the fit): "epoch" counts the epochs done
        done, step = int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0))
        self.epochs_saved = done
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
        steps = f" (step {step} of {trainer.max_steps})" if trainer.max_steps not in (None, -1) else ""
        if trainer.is_global_zero:
            log.info("resuming from epoch %d of %s%s: %s", done, epochs, steps, self.path)
        if self._pending is None:
            log.warning("checkpoint without RNG states (written before texad.resume): the resumed run may "
                        "differ from an uninterrupted one")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After on_fit_start (which may draw random numbers again), before the first resumed epoch."""
        state, self._pending = self._pending, None
        if not state:
            return
        set_rng_states(state["rng"])
        # An uninterrupted fit creates each later epoch's DataLoader iterator after on_train_epoch_start,
        # and creating one draws its base seed from the global torch RNG (one draw, unless the loader has
        # its own generator). A resumed fit draws it for its first epoch before on_train_start, i.e. before
        # the states above are set: make that draw again, so the epoch sees the random numbers it would have.
        loader = getattr(trainer, "train_dataloader", None)
        if isinstance(loader, torch.utils.data.DataLoader) and loader.generator is None:
            torch.empty((), dtype=torch.int64).random_()
        generators = module_generators(pl_module)
        for name, value in state.get("generators", {}).items():
            if name in generators:
                generators[name].set_state(value)
        if state.get("should_stop"):
            trainer.should_stop = True  # early stopping had ended the fit when the checkpoint was written

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not trainer.is_global_zero:
            return
        what = "Ctrl-C" if isinstance(exception, KeyboardInterrupt) else type(exception).__name__
        if self.epochs_saved > 0:
            log.warning("fit interrupted (%s) during %s; %s holds epoch %d: run again with the same "
                        "hydra.run.dir to resume from it", what, budget_running(trainer), self.path, self.epochs_saved)
        else:
            log.warning("fit interrupted (%s) during %s, before any epoch ended: no checkpoint to resume from",
                        what, budget_running(trainer))


def budget_running(trainer: L.Trainer) -> str:
    """'epoch N of M' with N the 1-based epoch in progress."""
    epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
    text = f"epoch {trainer.current_epoch + 1} of {epochs}"
    if trainer.max_steps not in (None, -1):
        text += f" (step {trainer.global_step} of {trainer.max_steps})"
    return text
