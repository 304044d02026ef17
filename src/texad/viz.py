"""Figures a person reads before trusting a number: anomaly-map overlays, PR and PRO curves.

Every figure carries what it needs to be read on its own: a title with the image score or the
metric value, a colour bar with the score scale, a legend for every line. Matplotlib runs with the
Agg canvas: figures are built as bare `Figure` objects, never through pyplot, so nothing changes
the process's backend (a notebook importing this keeps its inline plots), nothing needs a display,
and no global figure registry grows during long runs. PNGs are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from texad.outputs import atomic_write

HEAT_CMAP = "jet"
GT_COLOUR = "#00ff00"
PRED_COLOUR = "white"


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure on an Agg canvas, outside pyplot (see the module docstring)."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """PNG written atomically (a killed run never leaves half a file)."""
    # constrained layout instead of bbox_inches="tight", which would draw everything twice
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, pil_kwargs={"compress_level": 3}))


def label_text(label: int | None, defect_type: str | None = None) -> str:
    if label is None or label < 0:
        return "label: unknown"
    if label == 0:
        return "label: good"
    return f"label: anomalous ({defect_type})" if defect_type and defect_type != "good" else "label: anomalous"


def overlay_figure(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    score: float,
    title: str,
    label: int | None = None,
    defect_type: str | None = None,
    mask: np.ndarray | None = None,
    mask_name: str = "ground truth",
    threshold: float | None = None,
    threshold_name: str = "threshold",
    value_range: tuple[float, float] | None = None,
    subtitle: str | None = None,
) -> Figure:
    """Input | input with the mask's contour | heat map over the input with a colour bar.

    `mask` is the ground truth (or, with `mask_name`, e.g. a predicted mask); `subtitle` replaces
    the label text after the score in the title.
    `value_range` fixes the colour scale (share one range across a run, so a quiet normal image
    looks quiet); `threshold` draws the predicted region's contour and a line on the colour bar.
    """
    amap = np.asarray(anomaly_map, dtype=np.float32)
    vmin, vmax = value_range if value_range is not None else (float(amap.min()), float(amap.max()))
    if not vmax > vmin:
        vmax = vmin + 1e-6
    fig = new_figure((11.5, 4.2))
    axes = fig.subplots(1, 3)
    axes[0].imshow(image)
    axes[0].set_title("input")
    axes[1].imshow(image)
    handles = []
    if mask is not None and np.asarray(mask).any():
        axes[1].contour(np.asarray(mask, dtype=float), levels=[0.5], colors=GT_COLOUR, linewidths=1.2)
        handles.append(Line2D([], [], color=GT_COLOUR, label=mask_name))
        axes[1].set_title(mask_name)
    else:
        empty = "no defect" if mask_name == "ground truth" else "empty"
        axes[1].set_title(f"{mask_name}: none" if mask is None else f"{mask_name}: {empty}")
    axes[2].imshow(image)
    heat = axes[2].imshow(amap, cmap=HEAT_CMAP, alpha=0.5, vmin=vmin, vmax=vmax)
    axes[2].set_title("anomaly map")
    bar = fig.colorbar(heat, ax=axes[2], shrink=0.9)
    bar.set_label("anomaly score")
    if threshold is not None:
        if amap.max() >= threshold:
            axes[2].contour(amap, levels=[threshold], colors=PRED_COLOUR, linewidths=1.0, linestyles="--")
        if vmin <= threshold <= vmax:
            bar.ax.axhline(threshold, color="black", linewidth=1.5)
        handles.append(
            Line2D([], [], color=PRED_COLOUR, linestyle="--", label=f"score ≥ {threshold:.4g} ({threshold_name})")
        )
    if mask is not None and np.asarray(mask).any() and mask_name == "ground truth":
        axes[2].contour(np.asarray(mask, dtype=float), levels=[0.5], colors=GT_COLOUR, linewidths=0.8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if handles:
        legend = fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=True, fontsize=9)
        legend.get_frame().set_facecolor("#bbbbbb")
    tail = subtitle if subtitle is not None else label_text(label, defect_type)
    fig.suptitle(f"{title}    score = {score:.4g}    {tail}", fontsize=11)
    return fig


def _finish_unit_curve(ax, xlabel: str, ylabel: str, legend_loc: str, title: str, note: str) -> None:
    """Axes of a curve on the unit square (PR, PRO): limits, labels, grid, legend, title (+ note)."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend_loc, fontsize=8)
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)


def pr_figure(
    precision: np.ndarray,
    recall: np.ndarray,
    *,
    ap: float,
    prevalence: float,
    best: tuple[float, float, float, float] | None = None,
    operating: tuple[float, float, float, str] | None = None,
    note: str = "",
) -> Figure:
    """Pixel precision-recall curve. `best` = (recall, precision, F1, threshold) of the best F1;
    `operating` = (recall, precision, threshold, name) of a threshold chosen elsewhere (validation)."""
    fig = new_figure((5.6, 4.8))
    ax = fig.subplots()
    r = np.concatenate([[0.0], recall])
    p = np.concatenate([[precision[0] if precision.size else 1.0], precision])
    ax.plot(r, p, drawstyle="steps-pre", color="C0", linewidth=1.6, label=f"test pixels (AP = {ap:.3f})")
    ax.axhline(prevalence, color="grey", linestyle=":", label=f"chance (anomalous pixels = {prevalence:.3f})")
    if best is not None:
        ax.plot(best[0], best[1], "o", color="C3", label=f"best F1 = {best[2]:.3f} at t = {best[3]:.4g}")
    if operating is not None:
        ax.plot(operating[0], operating[1], "s", color="C2", label=f"{operating[3]} t = {operating[2]:.4g}")
    _finish_unit_curve(ax, "recall", "precision", "upper right", f"Pixel precision-recall — AP = {ap:.3f}", note)
    return fig


def pro_figure(fpr: np.ndarray, pro: np.ndarray, *, aupro: float, fpr_limit: float = 0.3, note: str = "") -> Figure:
    """Per-region-overlap curve over the full FPR range; the integrated part up to `fpr_limit` shaded."""
    fig = new_figure((5.6, 4.8))
    ax = fig.subplots()
    ax.plot(fpr, pro, color="C1", linewidth=1.6, label=f"test PRO curve (AUPRO@{fpr_limit:g} = {aupro:.3f})")
    inside = fpr <= fpr_limit
    if inside.any():
        x = np.append(fpr[inside], fpr_limit)
        y = np.append(pro[inside], np.interp(fpr_limit, fpr, pro))
        ax.fill_between(x, y, color="C1", alpha=0.2, label=f"area integrated (FPR ≤ {fpr_limit:g}), ÷ {fpr_limit:g}")
    ax.axvline(fpr_limit, color="grey", linestyle="--", linewidth=1, label=f"FPR limit {fpr_limit:g}")
    _finish_unit_curve(
        ax, "false-positive rate (normal pixels)", "per-region overlap", "lower right",
        f"PRO curve — AUPRO@{fpr_limit:g} = {aupro:.3f}", note,
    )
    return fig


def metric_vs_param_figure(
    param: str, values: Sequence, metric: str, scores: Sequence[float | None], best_index: int | None = None
) -> Figure:
    """One metric against one swept parameter (numeric axis when every value is a number)."""
    fig = new_figure((5.6, 4.2))
    ax = fig.subplots()
    keep = [(v, s) for v, s in zip(values, scores) if s is not None]
    numeric = bool(keep) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in keep)
    if numeric:
        xs = np.array([float(v) for v, _ in keep])
        ys = np.array([float(s) for _, s in keep])
        ax.plot(xs, ys, "o", color="C0", alpha=0.8, label=f"runs ({len(keep)})")
        uniq = np.unique(xs)
        ax.plot(uniq, [ys[xs == u].mean() for u in uniq], "-", color="C0", alpha=0.6, label="mean per value")
        positive = xs[xs > 0]
        if positive.size == xs.size and positive.size > 1 and positive.max() / positive.min() >= 100:
            ax.set_xscale("log")
    else:
        labels = sorted({str(v) for v, _ in keep})
        pos = {lab: i for i, lab in enumerate(labels)}
        xs = np.array([pos[str(v)] for v, _ in keep], dtype=float)
        ys = np.array([float(s) for _, s in keep])
        ax.plot(xs, ys, "o", color="C0", alpha=0.8, label=f"runs ({len(keep)})")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    if best_index is not None and scores[best_index] is not None:
        bv = values[best_index]
        bx = float(bv) if numeric else float(sorted({str(v) for v, _ in keep}).index(str(bv)))
        ax.plot(bx, float(scores[best_index]), "*", color="C3", markersize=14, label=f"best {metric} = {float(scores[best_index]):.4g}")
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{metric} vs {param}", fontsize=10)
    return fig
