"""Label-free choices of the clustering method, made on data that are not the test sets.

``python -m texad.tools.clustering_study k`` — which criterion estimates the number of clusters
(``number.py``): Gaussian mixtures of 40 points (the size of our clustered sets) with 2…8
clusters, balanced or unbalanced sizes, isotropic or anisotropic spread, in 16 or 128 dimensions,
at a clear separation (centre spread 4× the within-cluster spread) and a harder one (1.5×).
Prints, per criterion and regime, how often the true k is found and the mean |k̂ − k|.

``python -m texad.tools.clustering_study descriptors --texture brick`` — descriptor options on a
*validation* set that shares nothing with the test set: the normal *training* images of the
embedded set, each with one defect from five generators that are **not** the test set's families
(``VALIDATION_TYPES``: a flat disc, a stripe patch, a blurred patch, a noise patch, a colour tint),
so the choice cannot fit the test families. Maps: FCA (``texad.methods.fca``) computed on those
images, and their exact masks (oracle). Prints NMI / ARI / F1 (true k) of the raw and head
descriptors for each option; the head is trained as the method trains it (``anchor_loss``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from texad.methods.clustering.number import K_CRITERIA, estimate_k
from texad.tools.clustering_descriptors import study_descriptors

# --- k criteria on synthetic mixtures ----------------------------------------------------------
def gaussian_mixture(rng: np.random.Generator, n: int, k: int, dim: int, separation: float,
                     balanced: bool, anisotropic: bool) -> tuple[np.ndarray, np.ndarray]:
    """n points of k Gaussian clusters (each at least 2 points): centres ~ N(0, separation²),
    points ~ N(centre, diag(scale²)), scale 1 or per-cluster, per-dimension in [0.3, 3]."""
    if balanced:
        sizes = np.full(k, n // k)
        sizes[: n - sizes.sum()] += 1
    else:
        sizes = 2 + rng.multinomial(n - 2 * k, rng.dirichlet(np.ones(k)))
    centres = rng.normal(0, separation, (k, dim))
    points, labels = [], []
    for c, size in enumerate(sizes):
        scale = rng.uniform(0.3, 3.0, dim) if anisotropic else np.ones(dim)
        if anisotropic:  # keep the mean spread comparable to the isotropic case
            scale = scale / np.sqrt(np.mean(scale**2))
        points.append(centres[c] + rng.normal(0, 1, (size, dim)) * scale)
        labels += [c] * int(size)
    return np.concatenate(points), np.array(labels)


def study_k(reps: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    results = {}
    for separation in (4.0, 1.5):
        for balanced, anisotropic, dim in itertools.product((True, False), (False, True), (16, 128)):
            stats = {c: [] for c in K_CRITERIA}
            for _ in range(reps):
                for k in (2, 3, 4, 5, 6, 8):
                    x, _ = gaussian_mixture(rng, 40, k, dim, separation, balanced, anisotropic)
                    for c in K_CRITERIA:
                        stats[c].append((estimate_k(x, c, 2, 10), k))
            key = f"sep{separation:g} {'bal' if balanced else 'unbal'} {'aniso' if anisotropic else 'iso'} d{dim}"
            results[key] = {c: {"exact": float(np.mean([e == t for e, t in v])),
                                "mean_abs_err": float(np.mean([abs(e - t) for e, t in v]))} for c, v in stats.items()}
            print(key, "  ".join(f"{c}: {r['exact']:.2f} ({r['mean_abs_err']:.2f})" for c, r in results[key].items()),
                  flush=True)
    for separation in ("sep4", "sep1.5"):
        rows = [r for key, r in results.items() if key.startswith(separation + " ")]
        print(separation, "mean exact:", {c: round(float(np.mean([r[c]["exact"] for r in rows])), 3) for c in K_CRITERIA})
    return results


# --- validation defects from other generators ----------------------------------------------------
def results_table(run_dirs: list[str]) -> str:
    """Markdown table of clustering runs: maps source × raw/head × NMI/ARI/F1 at the true and the estimated k."""
    lines = ["| set | maps | P-AUROC | desc. | true k | NMI | ARI | F1 | est. k | NMI | ARI | F1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in run_dirs:
        r = json.loads((Path(run) / "metrics.json").read_text())
        for kind, p in (("raw", "raw_"), ("head", "")):
            k_est = r.get(f"{p}k_estimated")
            cells = [r.get("dataset", "?"), r.get("maps_source", "?"), f"{r.get('pixel_auroc') or float('nan'):.3f}",
                     kind, str(r.get("n_types"))]
            cells += [f"{r.get(f'true_k_{p}{m}', float('nan')):.3f}" for m in ("nmi", "ari", "cluster_f1")]
            cells += [str(k_est)] + [f"{r.get(f'est_k_{p}{m}', float('nan')):.3f}" for m in ("nmi", "ari", "cluster_f1")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("k", "descriptors", "table"))
    parser.add_argument("runs", nargs="*", help="table: run dirs holding metrics.json")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--texture", default="brick")
    parser.add_argument("--per-type", type=int, default=8)
    parser.add_argument("--only", type=int, nargs="*", default=None, help="indices into validation_study.OPTIONS")
    parser.add_argument("--maps", nargs="*", default=["fca", "gt"], help="descriptors: map sources to try")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    if args.what == "table":
        print(results_table(args.runs))
        return
    if args.what == "k":
        result = study_k(args.reps)
    else:
        result = study_descriptors(args.texture, args.per_type, only=args.only, sources=args.maps)
    print(f"done in {time.time() - start:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
