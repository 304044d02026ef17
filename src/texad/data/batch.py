"""The batch contract shared by every datamodule and method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Batch:
    """One collated batch.

    image: (B,3,H,W) normalised for the backbone; mask: (B,1,H,W) 0/1 or None when the dataset has
    no pixel labels; label: (B,) 0/1; superpixels: (B,levels,H,W) int labels or None.
    """

    image: torch.Tensor
    label: torch.Tensor
    path: list[str]
    defect_type: list[str]
    mask: torch.Tensor | None = None
    superpixels: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.image.shape[0]


def collate(items: list[dict[str, Any]]) -> Batch:
    """Stack dataset items (dicts) into a Batch; masks/superpixels only when every item has them."""
    known = {"image", "label", "path", "defect_type", "mask", "superpixels"}
    extra = {
        key: torch.stack([it[key] for it in items])
        for key in items[0]
        if key not in known and isinstance(items[0][key], torch.Tensor)
    }
    masks = [it.get("mask") for it in items]
    sps = [it.get("superpixels") for it in items]
    return Batch(
        image=torch.stack([it["image"] for it in items]),
        label=torch.as_tensor([int(it["label"]) for it in items], dtype=torch.long),
        path=[str(it["path"]) for it in items],
        defect_type=[str(it["defect_type"]) for it in items],
        mask=torch.stack(masks) if all(m is not None for m in masks) else None,
        superpixels=torch.stack(sps) if all(s is not None for s in sps) else None,
        extra=extra,
    )
