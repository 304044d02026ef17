"""Label-free choices of the clustering method, made on data that are not the test sets.

``python -m texad.tools.clustering_study k`` — which criterion estimates the number of clusters
(``number.py``): Gaussian mixtures of 40 points (the size of our clustered sets) with 2…8
clusters, balanced or unbalanced sizes, isotropic or anisotropic spread, in 16 or 128 dimensions,
at a clear separation (centre spread 4× the within-cluster spread) and a harder one (1.5×).
Prints, per criterion and regime, how often the true k is found and the mean |k̂ − k|.

``python -m texad.tools.clustering_study summary <run dirs>`` — head vs raw over runs (e.g. seeds) of
the clustering method: per data set and map source, NMI / ARI / F1 at the true k (mean ± std over the
runs), the paired difference head − raw of the seed means with a 95 % interval (the same bootstrap
draws of test images for every run, types kept: ``metrics.clustering.paired_clustering_differences``)
at the true k and at the k in use, and the estimated vs the true number of types. Reads each run's
metrics.json and clusters.csv; ``--out`` writes the figures as JSON.

The settings the runs used were chosen on typed validation defects inside each run (``selection.py``);
nothing here chooses anything.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from texad.methods.clustering.number import K_CRITERIA, estimate_k
from texad.errors import TexadError
from texad.metrics.clustering import cluster_scores, paired_clustering_differences

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


def _read_run(run: str) -> tuple[dict, list[dict]]:
    folder = Path(run)
    try:
        record = json.loads((folder / "metrics.json").read_text())
        with open(folder / "clusters.csv", newline="") as f:
            rows = sorted(csv.DictReader(f), key=lambda row: row["path"])
    except (OSError, json.JSONDecodeError) as err:
        raise TexadError(f"{run}: expected a clustering run dir with metrics.json and clusters.csv ({err})") from err
    if "cluster_true_k" not in (rows[0] if rows else {}):
        raise TexadError(f"{run}/clusters.csv has no cluster_true_k column (a run without type labels, or older)")
    return record, rows


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def summary(run_dirs: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """Per (data set, map source): the runs pooled as described in the module docstring."""
    groups: dict[tuple[str, str], list[tuple[dict, list[dict]]]] = defaultdict(list)
    for run in run_dirs:
        record, rows = _read_run(run)
        groups[(str(record.get("dataset")), str(record.get("maps_source")))].append((record, rows))
    lines = ["| set | maps | seeds | raw NMI | head NMI | head − raw NMI [95 %] | ARI [95 %] | F1 [95 %] | "
             "at k in use: NMI [95 %] | k̂ head | k̂ raw | k |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    out = []
    for (dataset, maps), runs in sorted(groups.items()):
        paths = [row["path"] for row in runs[0][1]]
        if any([row["path"] for row in rows] != paths for _, rows in runs):
            raise TexadError(f"{dataset} / {maps}: the runs clustered different images; pool runs of one test set only")
        types = [row["defect_type"] for row in runs[0][1]]
        target = np.unique(types, return_inverse=True)[1]

        def ids(column: str) -> list[np.ndarray]:
            return [np.array([int(row[column]) for row in rows]) for _, rows in runs]

        true_k = paired_clustering_differences(ids("cluster_true_k"), ids("raw_cluster_true_k"), target)
        in_use = paired_clustering_differences(ids("cluster"), ids("raw_cluster"), target)
        per_seed = {kind: [cluster_scores(c, target)["nmi"] for c in ids(column)]
                    for kind, column in (("head", "cluster_true_k"), ("raw", "raw_cluster_true_k"))}
        k_true = len(set(types))
        k_head = [r.get("k_estimated") for r, _ in runs]
        k_raw = [r.get("raw_k_estimated") for r, _ in runs]
        entry = {"dataset": dataset, "maps": maps, "seeds": [r.get("seed") for r, _ in runs], "n_types": k_true,
                 "nmi_true_k": per_seed, "head_minus_raw_true_k": true_k, "head_minus_raw_in_use": in_use,
                 "k_estimated": {"head": k_head, "raw": k_raw},
                 "k_rules": {"head": [r.get("k_rule") for r, _ in runs], "raw": [r.get("raw_k_rule") for r, _ in runs]}}
        out.append(entry)

        def diff(d: dict) -> str:
            mark = "*" if d["excludes_zero"] else ""
            return f"{d['difference']:+.3f}{mark} [{d['low']:+.3f}, {d['high']:+.3f}]"

        lines.append(f"| {dataset} | {maps} | {len(runs)} | {_mean_std(per_seed['raw'])} | {_mean_std(per_seed['head'])} | "
                     f"{diff(true_k['nmi'])} | {diff(true_k['ari'])} | {diff(true_k['cluster_f1'])} | "
                     f"{diff(in_use['nmi'])} | {', '.join(map(str, k_head))} | {', '.join(map(str, k_raw))} | {k_true} |")
    lines.append("\nNMI / ARI / F1 at the true k unless marked; * = the 95 % interval of head − raw excludes 0.")
    lines += ["", "What validation chose in each run (typed validation families; no test type seen):", "",
              "| set | maps | val raw NMI | val head NMI | head: τ, layers, k, mutual, negatives, epochs (per seed) | "
              "k rule head (val mean abs k̂ − k) |", "|---|---|---|---|---|---|"]
    for entry, ((dataset, maps), runs) in zip(out, sorted(groups.items())):
        sel = [r.get("selection") or {} for r, _ in runs]
        if not all(x.get("status") == "chosen on validation" for x in sel):
            lines.append(f"| {dataset} | {maps} | – | – | {sel[0].get('status', 'no selection recorded')} | – |")
            continue
        val = {kind: [x["val_nmi"][kind] for x in sel] for kind in ("raw", "head")}
        entry["validation"] = {"nmi": val, "chosen": [x["chosen"] for x in sel]}
        heads = "; ".join(_setting_text(x["chosen"]["head"]) for x in sel)
        rules = "; ".join(_rule_text(x["chosen"]["k_rule"]["head"], x["k_rule_errors"]["head"]) for x in sel)
        lines.append(f"| {dataset} | {maps} | {_mean_std(val['raw'])} | {_mean_std(val['head'])} | {heads} | {rules} |")
    return "\n".join(lines), out


def _setting_text(head: dict) -> str:
    layers = "".join(str(i) for i in head["layers"])
    return (f"{head['temperature']:g}, {layers}, {head['k']}{'m' if head['mutual'] else ''}, {head['n_negatives']}, "
            f"{head['epochs']}")


def _rule_text(rule: dict, errors: dict) -> str:
    name = rule["criterion"]
    text = f"{name} ×{rule['factor']:.1f}" if name == "height" else name
    return f"{text} ({errors[name]['mean_abs_error']:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("k", "table", "summary"))
    parser.add_argument("runs", nargs="*", help="table / summary: run dirs holding metrics.json (and clusters.csv)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    if args.what == "table":
        print(results_table(args.runs))
        return
    if args.what == "summary":
        text, result = summary(args.runs)
        print(text)
    else:
        result = study_k(args.reps)
        print(f"done in {time.time() - start:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
