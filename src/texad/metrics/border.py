"""Border-artifact check: how much hotter a map is in a ring along the image border than inside.

Zero padding in a backbone (and reflect padding of feature maps) makes border patches unlike any
interior patch; a method that scores them high lights up the border of *normal* images and its
image score (the map's maximum) then ranks images by their borders. The ratio is measured on
normal images only (training or validation normals), so it can guide defaults without the test set.

ring_ratio = mean score in the ring of width `ring` / mean score of the interior, computed on maps
shifted so each image's minimum is 0 (a constant offset would otherwise pull every ratio to 1).
A value near 1 means no border artifact; a zeroed border gives a value near 0 (not a fix either).
"""

from __future__ import annotations

import torch

from texad.errors import TexadError

#: ring width at a 256-pixel side; scaled with the image side (16 px at 256² as issue #12 measures)
RING_AT_256 = 16


def ring_width(side: int) -> int:
    """The border ring's width for an image side: 16 px at 256, proportional otherwise (≥ 1)."""
    return max(1, round(RING_AT_256 * side / 256))


def ring_sums(maps: torch.Tensor, ring: int | None = None) -> torch.Tensor:
    """[border sum, border count, interior sum, interior count] of min-shifted maps (B, H, W).

    Sums add up over batches, so `ratio_of_sums` of the accumulated vector equals `ring_ratio` of
    all maps at once.
    """
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3:
        raise TexadError(f"ring_ratio needs maps of shape (B, H, W), got {tuple(maps.shape)}")
    h, w = maps.shape[-2:]
    ring = ring_width(min(h, w)) if ring is None else int(ring)
    if not 0 < 2 * ring < min(h, w):
        raise TexadError(f"ring width {ring} does not fit maps of {h}×{w}")
    x = maps.detach().double()
    x = x - x.flatten(1).amin(1)[:, None, None]
    inner = torch.zeros(h, w, dtype=torch.bool, device=x.device)
    inner[ring : h - ring, ring : w - ring] = True
    n_inner = int(inner.sum()) * x.shape[0]
    return torch.tensor(
        [float(x[:, ~inner].sum()), x.numel() - n_inner, float(x[:, inner].sum()), n_inner], dtype=torch.float64
    )


def ratio_of_sums(sums: torch.Tensor) -> float | None:
    """Border mean over interior mean from accumulated `ring_sums` (None when nothing was added)."""
    border_sum, border_n, inner_sum, inner_n = (float(v) for v in sums)
    if border_n == 0 or inner_n == 0:
        return None
    border, inside = border_sum / border_n, inner_sum / inner_n
    if inside <= 0:
        return float("inf") if border > 0 else 1.0
    return border / inside


def ring_ratio(maps: torch.Tensor, ring: int | None = None) -> float:
    """Mean of the border ring over the mean of the interior, over a batch of maps (B, H, W).

    Each map is shifted by its own minimum first. `ring` defaults to `ring_width(min(H, W))`.
    """
    return ratio_of_sums(ring_sums(maps, ring))
