"""Frozen-feature cache: a frozen backbone gives the same features for a training image every epoch.

With `dataset.cache_features=true` the first epoch computes (or loads from disk) the backbone
features of each training image once; later epochs, and later runs with the same training images,
image size, backbone and views, only run the trainable parts. The features are the exact tensors
the backbone would produce, so results do not change.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from texad.outputs import atomic_write
from texad.outputs import digest

log = logging.getLogger(__name__)


def feature_key(description: Any) -> str:
    return digest(description)[:24]


class FrozenFeatureCache:
    """Memo of per-image frozen features by training-set index, optionally persisted to disk."""

    def __init__(self, n_items: int, path: Path | None = None) -> None:
        self.n_items, self.path = n_items, path
        self.items: dict[int, dict[str, torch.Tensor]] = {}
        self.hits = self.misses = 0
        if path is not None and path.is_file():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if len(stored) == n_items:
                self.items = {int(k): v for k, v in stored.items()}
                log.info("feature cache: loaded %d images from %s", n_items, path)

    @property
    def complete(self) -> bool:
        return len(self.items) == self.n_items

    def features(
        self, indices: torch.Tensor, views: list[str], compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Features of a batch: cached when every image and view is known, else computed and stored."""
        idx = [int(i) for i in indices]
        if all(i in self.items and all(v in self.items[i] for v in views) for i in idx):
            self.hits += len(idx)
            device = indices.device
            return {v: torch.stack([self.items[i][v] for i in idx]).to(device) for v in views}
        feats = compute()
        self.misses += len(idx)
        for row, i in enumerate(idx):
            entry = self.items.setdefault(i, {})
            for v in views:
                entry[v] = feats[v][row].detach().cpu()
        return feats

    def save(self) -> None:
        """Persist once complete, atomically, for later runs with the same key."""
        if self.path is None or not self.complete or self.path.is_file():
            return
        atomic_write(self.path, lambda tmp: torch.save(self.items, tmp))
