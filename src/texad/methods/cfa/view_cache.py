"""A disk cache of trained Sp-CFA views and their score maps, so α can change without retraining.

Each view of CFA / Sp-CFA (the original image, or a superpixel mosaic at one region size) has its
own descriptor, memory bank and radius, trained only by its own loss term (the backbone is frozen
and AdamW is per parameter), so a trained view does not depend on α nor on which other views are
on. It is stored under a key of everything that does decide it (`view_key`); runs that differ only
in α, or share one region size, load it instead of training it. Score maps of a trained view on a
split are cached too, under the view key, a digest of the head's weights and the split name.

Layout: `<root>/heads/<key>.pt` (head state dict) and `<root>/maps/<key>-<split>.pt`
(`{"paths": [...], "maps": (N,H,W) float32}`); every write is atomic (temp file + rename).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import OmegaConf

from texad.outputs import atomic_write, digest

log = logging.getLogger(__name__)

#: bump when a change of the code changes what a cached view would contain
CACHE_VERSION = 4  # 4: aligned feature maps (texad.geometry)

#: dataset keys that change neither the images nor the training (loader plumbing only)
_DATASET_IGNORED = ("eval_batch_size", "num_workers", "_convert_")
#: backbone keys that change no feature (where a cache lives)
_BACKBONE_IGNORED = ("geometry_cache",)
#: method keys that decide one trained view (α, blur and the other views' settings do not)
_TRAINING_KEYS = (
    "_target_", "epochs", "k", "j", "r0", "loss_margin", "nu", "gamma_c", "gamma_d", "lr", "weight_decay",
    "amsgrad", "pool", "score", "input_padding", "input_padding_mode", "calibration",
)
#: trainer keys that change the optimisation
_TRAINER_KEYS = (
    "max_epochs", "max_steps", "precision", "gradient_clip_val", "gradient_clip_algorithm",
    "accumulate_grad_batches", "limit_train_batches",
)


def run_description(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What of the run decides a trained view besides the view itself (a plain dict of resolved values).

    The pipeline builds it from the run config and hands it to the method (`attach_views`), so a
    method never reads the config: data set, backbone, the method's training keys, trainer keys that
    change the optimisation, seed and the epoch selection (the kept head is the selected epoch's).
    """
    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    method, dataset = plain["method"], plain["dataset"]
    trainer = plain.get("trainer") or {}
    return {
        "version": CACHE_VERSION,
        "dataset": {k: v for k, v in dataset.items() if k not in _DATASET_IGNORED},
        "backbone": {k: v for k, v in plain["backbone"].items() if k not in _BACKBONE_IGNORED},
        "training": {
            **{k: method.get(k) for k in _TRAINING_KEYS},
            "trainer": {k: trainer.get(k) for k in _TRAINER_KEYS},
        },
        "seed": plain.get("seed"),
        "selection": {"conf": plain.get("selection"), "metric": plain.get("optimized_metric")},
    }


def view_description(run: Mapping[str, Any], view: Mapping[str, Any], loss_weight: float) -> dict[str, Any]:
    """Everything that decides one trained view: `run_description(cfg)` plus the view and its loss weight.

    `view` is `{"kind": "original"}` or `{"kind": "superpixel", "region_size": rs, "slic": {...}}`:
    the slot name ("small"/"big") is not part of it, so rs=10 is one view wherever it sits.
    """
    return {**run, "view": dict(view), "training": {**run["training"], "loss_weight": float(loss_weight)}}


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Digest of a head's weights: maps are only reused for the exact weights that made them."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ViewCache:
    """Trained heads and per-split score maps under `root`, by key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()

    def head_path(self, key: str) -> Path:
        return self.root / "heads" / f"{key}.pt"

    def maps_path(self, key: str, split: str) -> Path:
        return self.root / "maps" / f"{key}-{split}.pt"

    def _load(self, path: Path) -> Any | None:
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # an unreadable entry is a miss; it will be overwritten
            log.warning("view cache: ignoring unreadable %s (%s)", path, err)
            return None

    def _store(self, path: Path, obj: Any) -> None:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))

    def load_head(self, key: str) -> dict[str, torch.Tensor] | None:
        entry = self._load(self.head_path(key))
        return None if entry is None else entry["state"]

    def store_head(self, key: str, state: Mapping[str, torch.Tensor], description: Any = None) -> None:
        state = {k: v.detach().cpu().clone() for k, v in state.items()}
        self._store(self.head_path(key), {"state": state, "description": description})

    def load_maps(self, key: str, split: str) -> dict[str, torch.Tensor]:
        """path → (H,W) map; empty when nothing is cached."""
        entry = self._load(self.maps_path(key, split))
        if entry is None:
            return {}
        return dict(zip(entry["paths"], entry["maps"]))

    def store_maps(self, key: str, split: str, maps: Mapping[str, torch.Tensor]) -> None:
        paths = list(maps)
        stacked = torch.stack([maps[p].float().cpu() for p in paths]) if paths else torch.empty(0)
        self._store(self.maps_path(key, split), {"paths": paths, "maps": stacked})


__all__ = ["CACHE_VERSION", "ViewCache", "digest", "run_description", "state_digest", "view_description"]
