"""Pictures of a clustering run, written to the run dir.

* ``clusters.png`` — 2-D PCA of the descriptors before / after the head; colour = true defect type,
  marker = Ward cluster; NMI / ARI / F1 in the titles.
* ``cluster_grid.png`` — one row per found cluster (after the head), largest first: a few
  thumbnails of its images, each with its anomaly map's contour (the level halfway between the
  map's median and its maximum, the pixels the descriptor attends to), titled with the image's true
  type; the row label gives the cluster's size and its type composition. So a person sees what each
  found type looks like and how pure it is.
* ``dendrogram.png`` — the Ward tree of the head's descriptors with the cut that gives the number of
  clusters in use (dashed line), leaves labelled and coloured by true type.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
import numpy as np
import torch
from scipy.cluster.hierarchy import dendrogram

from texad.viz import save_figure
from texad.artifacts import write_csv

__all__ = ["write_cluster_outputs", "plot_projection", "plot_cluster_grid", "plot_dendrogram"]


def _figure(figsize: tuple[float, float], dpi: int, rows: int = 1, cols: int = 1, squeeze: bool = True):
    """A bare Agg figure (as texad.viz: never pyplot, so the process's backend is left alone) and its axes;
    laid out by the callers' tight_layout."""
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def _save(fig, path: Path) -> None:
    save_figure(fig, path, dpi=int(fig.get_dpi()))


def _type_colours(classes: list[str]):
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    return {name: cmap(i) for i, name in enumerate(classes)}


def write_cluster_outputs(out_dir: Path, paths: list[str], types: list[str], clusters: dict[str, np.ndarray],
                          descriptors: dict[str, torch.Tensor], scores: dict[str, dict[str, float]],
                          linkages: dict[str, np.ndarray], used_k: dict[str, int],
                          thumbnails: list[torch.Tensor], thumb_maps: list[torch.Tensor],
                          per_cluster: int = 6, k_how: dict[str, str] | None = None,
                          extra_columns: dict[str, np.ndarray] | None = None) -> None:
    """clusters.csv (one row per clustered image) and the three pictures.

    ``scores`` per kind may be None (images without type labels: nothing to score); ``k_how`` per kind
    says how the number of clusters was chosen, printed in the grid's and the dendrogram's titles;
    ``extra_columns`` (name → one id per image) are added to clusters.csv (e.g. the cuts at the true k)."""
    k_how, extra = k_how or {}, extra_columns or {}
    rows = [{"path": p, "defect_type": t, "cluster": int(c), "raw_cluster": int(r),
             **{name: int(ids[i]) for name, ids in extra.items()}}
            for i, (p, t, c, r) in enumerate(zip(paths, types, clusters["head"], clusters["raw"]))]
    write_csv(out_dir / "clusters.csv", rows, ["path", "defect_type", "cluster", "raw_cluster", *extra])
    plot_projection(out_dir / "clusters.png", types, clusters, descriptors, scores)
    plot_cluster_grid(out_dir / "cluster_grid.png", types, clusters["head"], thumbnails, thumb_maps, per_cluster,
                      scores["head"], k_how.get("head"))
    plot_dendrogram(out_dir / "dendrogram.png", types, linkages["head"], used_k["head"], scores["head"],
                    k_how.get("head"))


def _pca_2d(x: torch.Tensor) -> np.ndarray:
    x = x.double() - x.double().mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return (x @ v[:2].T).numpy() if v.shape[0] >= 2 else np.c_[x @ v[:1].T, np.zeros(len(x))]


def plot_projection(path: Path, types: list[str], clusters: dict[str, np.ndarray],
                    descriptors: dict[str, torch.Tensor], scores: dict[str, dict[str, float]]) -> None:
    """Two PCA panels (descriptors without / with the head), colour = true defect type, marker = cluster."""
    classes = sorted(set(types))
    colours = _type_colours(classes)
    markers = "o^sDvP*XhH<>p"
    fig, axes = _figure((13, 6), 110, 1, 2)
    for ax, (kind, title) in zip(axes, (("raw", "map-weighted backbone features (no head)"),
                                        ("head", "after the contrastive head"))):
        xy = _pca_2d(descriptors[kind])
        for name in classes:
            for cluster in np.unique(clusters[kind]):
                sel = np.array([t == name for t in types]) & (clusters[kind] == cluster)
                if sel.any():
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=55, color=colours[name],
                               marker=markers[int(cluster) % len(markers)], edgecolors="black", linewidths=0.4)
        s = scores.get(kind)
        line = f"{len(np.unique(clusters[kind]))} clusters"
        if s:
            line += f"   NMI {s['nmi']:.2f}   ARI {s['ari']:.2f}   F1 {s['cluster_f1']:.2f}"
        ax.set_title(f"{title}\n{line}", fontsize=11)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="", color=colours[name], markeredgecolor="black",
                          markersize=8, label=name) for name in classes]
    fig.legend(handles=handles, title="defect type (colour)", loc="center right", frameon=True)
    fig.suptitle(f"Anomaly clustering of {len(types)} images: colour = true defect type, marker shape = Ward cluster",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 0.86, 0.95))
    _save(fig, path)


def clusters_by_size(clusters: np.ndarray) -> list[int]:
    """Cluster ids, largest first (ties: smaller id first)."""
    counts = Counter(int(c) for c in clusters)
    return sorted(counts, key=lambda c: (-counts[c], c))


def plot_cluster_grid(path: Path, types: list[str], clusters: np.ndarray, thumbnails: list[torch.Tensor],
                      thumb_maps: list[torch.Tensor], per_cluster: int = 6,
                      scores: dict[str, float] | None = None, k_how: str | None = None) -> None:
    """One row per cluster (largest first): up to ``per_cluster`` thumbnails with the map contour."""
    classes = sorted(set(types))
    colours = _type_colours(classes)
    order = clusters_by_size(clusters)
    per_cluster = max(1, int(per_cluster))
    rows, cols = len(order), per_cluster
    fig, axes = _figure((1.9 * cols + 2.6, 2.05 * rows + 0.8), 100, rows, cols, squeeze=False)
    for r, cluster in enumerate(order):
        members = [i for i in range(len(types)) if int(clusters[i]) == cluster]
        composition = Counter(types[i] for i in members)
        # show the cluster's members spread over its types: most common type first, round-robin
        by_type = {t: [i for i in members if types[i] == t] for t, _ in composition.most_common()}
        shown: list[int] = []
        while len(shown) < min(cols, len(members)):
            for t in list(by_type):
                if by_type[t] and len(shown) < cols:
                    shown.append(by_type[t].pop(0))
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c >= len(shown):
                continue
            i = shown[c]
            ax.imshow(thumbnails[i].permute(1, 2, 0).numpy())
            amap = thumb_maps[i].float().numpy()
            level = float(np.median(amap) + 0.5 * (amap.max() - np.median(amap)))
            if amap.max() > amap.min():
                ax.contour(amap, levels=[level], colors=["#ff2020"], linewidths=1.2)
            for side in ax.spines.values():
                side.set_visible(True)
                side.set_color(colours[types[i]])
                side.set_linewidth(3)
            ax.set_title(types[i], fontsize=9, color="black")
        summary = ", ".join(f"{n} {t}" for t, n in composition.most_common())
        axes[r, 0].set_ylabel(f"cluster {r + 1}\n{len(members)} images", fontsize=10, rotation=0, ha="right",
                              va="center", labelpad=8)
        axes[r, -1].text(1.04, 0.5, _wrap(summary, 22), transform=axes[r, -1].transAxes, fontsize=8, va="center")
    title = f"{len(order)} clusters found among {len(types)} images (largest first); red = anomaly-map contour, " \
            "frame colour and caption = true type"
    if k_how:
        title += f"\nk = {len(order)}: {k_how}"
    if scores:
        title += f"\nNMI {scores['nmi']:.2f}   ARI {scores['ari']:.2f}   F1 {scores['cluster_f1']:.2f}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0.02, 0, 0.9, 0.96))
    _save(fig, path)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width))


def cut_height(linkage_matrix: np.ndarray, k: int) -> float:
    """A height that cuts the Ward tree into k clusters: midway between the two merges around it."""
    h = linkage_matrix[:, 2]
    n = len(h) + 1
    if k <= 1:
        return float(h[-1]) * 1.05
    if k >= n:
        return float(h[0]) / 2
    return float((h[n - k] + h[n - k - 1]) / 2)


def plot_dendrogram(path: Path, types: list[str], linkage_matrix: np.ndarray, k: int,
                    scores: dict[str, float] | None = None, k_how: str | None = None) -> None:
    """Ward dendrogram, leaves coloured by true type, with the cut into k clusters."""
    classes = sorted(set(types))
    colours = _type_colours(classes)
    height = cut_height(linkage_matrix, k)
    fig, ax = _figure((max(8.0, 0.28 * len(types) + 3), 5.5), 110)
    # links in one neutral colour (scipy's per-cluster link colours would look like type colours)
    tree = dendrogram(linkage_matrix, ax=ax, color_threshold=0, above_threshold_color="#555555",
                      labels=list(types), leaf_rotation=90, leaf_font_size=8)
    for label in ax.get_xmajorticklabels():
        label.set_color(colours.get(label.get_text(), "black"))
    ax.axhline(height, color="crimson", linestyle="--", linewidth=1.5, label=f"cut: {k} clusters")
    ax.set_ylabel("Ward merge distance")
    title = f"Ward dendrogram of the head's descriptors ({len(types)} images); leaf label = true type"
    if k_how:
        title += f"\ncut at k = {k}: {k_how}"
    if scores:
        title += f"\nNMI {scores['nmi']:.2f}   ARI {scores['ari']:.2f}   F1 {scores['cluster_f1']:.2f} at {k} clusters"
    ax.set_title(title, fontsize=10)
    handles = [Line2D([], [], color="crimson", linestyle="--", label=f"cut: {k} clusters")]
    handles += [Line2D([], [], marker="s", linestyle="", color=colours[c], label=c) for c in classes]
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    del tree
    fig.tight_layout()
    _save(fig, path)
