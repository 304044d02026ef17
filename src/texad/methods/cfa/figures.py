"""Sp-CFA's view overlay: what each view alone sees beside the fused map, for one image."""

from __future__ import annotations

from typing import Mapping

import numpy as np
from matplotlib.figure import Figure

from texad.viz import GT_COLOUR, HEAT_CMAP, new_figure


def view_overlay_figure(
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    ranges: Mapping[str, tuple[float, float]],
    mask: np.ndarray | None,
    title: str,
) -> Figure:
    """Input with the ground truth | one heat map per entry of `maps` (fused first, then each view).

    Each map has its own colour scale, `ranges[name]` (min and max over the whole split), so a
    view that is quiet on this image looks quiet, and the views' different score levels do not hide
    each other. The ground truth's contour is drawn on every panel.
    """
    names = list(maps)
    fig = new_figure((3.2 * (len(names) + 1), 3.6))
    axes = fig.subplots(1, len(names) + 1)
    has_mask = mask is not None and np.asarray(mask).any()
    axes[0].imshow(image)
    axes[0].set_title("input + ground truth" if has_mask else "input (no defect)")
    for ax, name in zip(axes[1:], names):
        low, high = ranges[name]
        ax.imshow(image)
        heat = ax.imshow(np.asarray(maps[name], np.float32), cmap=HEAT_CMAP, alpha=0.5, vmin=low,
                         vmax=high if high > low else low + 1e-6)
        ax.set_title(name if name == "fused" else f"{name} alone")
        fig.colorbar(heat, ax=ax, shrink=0.8)
    for ax in axes:
        if has_mask:
            ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors=GT_COLOUR, linewidths=0.8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return fig
