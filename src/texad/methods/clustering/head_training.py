"""The head's training set: pairs mined on the raw descriptors of the clustered images, the pixel
pools of each image, and the seeded order in which anchor images come (the trainer's loader)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from texad.data.datamodule import EpochSeededShuffle
from texad.methods.clustering.torch_model import mine_pairs, pair_training_data

log = logging.getLogger(__name__)


def mined_training_data(features: torch.Tensor, cleared_maps: torch.Tensor, raw_descriptors: torch.Tensor,
                        types: list[str], k: int, negative_quantile: float, mutual: bool,
                        anomalous_level: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Positives (k nearest) and negatives (far quantile) mined on the raw descriptors, then per image its
    anomalous and normal pixel pools (``pair_training_data``); features already restricted to the head's
    layers, maps border-cleared. Returns the training data and what to record (never used to choose:
    how often a mined positive shares the anchor's defect type)."""
    positives, negatives = mine_pairs(raw_descriptors, k, negative_quantile, mutual)
    pairs = [(i, j) for i in range(len(types)) for j in positives[i].tolist()]
    purity = float(np.mean([types[i] == types[j] for i, j in pairs]))
    info = {"n_train_images": len(types), "positive_purity": purity, "positives_per_image": len(pairs) / len(types)}
    log.info("clustering: %d images, positives of the same defect type: %.2f", len(types), purity)
    return pair_training_data(features, cleared_maps, positives, negatives, anomalous_level), info


def anchor_dataloader(n_images: int, anchors_per_step: int, seed: int) -> DataLoader:
    """Anchor image indices, `anchors_per_step` a step, reshuffled each epoch (seeded)."""
    return DataLoader(list(range(n_images)), batch_size=anchors_per_step,
                      sampler=EpochSeededShuffle(n_images, seed), collate_fn=torch.tensor)
