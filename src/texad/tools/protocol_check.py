"""Does validation rank settings like the test set? Spearman ρ between validation and test metrics.

    python -m texad.tools.protocol_check [--sets brick grass gravel] [--epochs 1 2 5 10 30]
                                   [--sigmas 2 4 8] [--spcfa] [--override KEY=VALUE ...] [--out DIR]

A selection protocol is only worth as much as its agreement with the test set on the settings it
chooses between. For each embedded set this trains CFA once, keeps its heads after each epoch in
`--epochs`, scores the validation and the test split with each under every patch score rule in
`--scores` (unsmoothed maps), and then, for every map blur σ in `--sigmas`, computes P-AUPR and AUPRO
on both splits: |epochs|×|rules|×|σ| settings. With
`--spcfa`, Sp-CFA is trained once on a fixed pair of region sizes and every α of a simplex grid is
scored on both splits. It prints, per set, Spearman ρ(validation, test) for P-AUPR and AUPRO, and the
rows behind it; writes `protocol_check.json` and `.md` to `--out`.

This script reads test metrics *to measure the protocol*, never to choose a setting: nothing it prints
is fed back into a default.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from scipy.stats import spearmanr

from texad.methods.cfa.fusion import simplex_grid
from texad.methods.cfa.scorer import SCORERS
from texad.methods.components.gaussian import gaussian_blur2d
from texad.methods.components.image_score import image_score
from texad.metrics import functional as mf
from texad.metrics.bootstrap import collect_statistics, rank_correlation_interval
from texad.metrics.border import ring_ratio
from texad.outputs import atomic_write, write_json
from texad.pipeline import build
from texad.tools import compose_train

log = logging.getLogger(__name__)

METRICS = ("pixel_aupr", "pixel_aupro")


class Snapshots(Callback):
    """Keeps a copy of the trainable heads after each of the wanted epochs."""

    def __init__(self, wanted: Sequence[int]) -> None:
        self.wanted, self.states = {int(e) for e in wanted}, {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if epoch in self.wanted:
            self.states[epoch] = copy.deepcopy(pl_module.model.heads.state_dict())


@torch.no_grad()
def split_maps(method, loader) -> dict[str, Any]:
    """Unsmoothed per-view maps (N,H,W), masks and labels of one split."""
    maps: dict[str, list[torch.Tensor]] = {}
    masks, labels, paths, types = [], [], [], []
    for batch in loader:
        feats = method._feats(batch)
        views = method.model.view_maps(feats, tuple(batch.image.shape[-2:]), batch.superpixels)
        for v, m in views.items():
            maps.setdefault(v, []).append(m.float().cpu())
        masks.append(batch.mask[:, 0].cpu() > 0.5)
        labels.append(batch.label.cpu())
        paths += list(batch.path)
        types += list(batch.defect_type)
    return {"maps": {v: torch.cat(m) for v, m in maps.items()}, "masks": torch.cat(masks), "labels": torch.cat(labels),
            "paths": paths, "types": types}


def statistics_of(amap: torch.Tensor, data: dict[str, Any]):
    """Bootstrap statistics (texad.metrics.bootstrap) of one split's maps at one setting."""
    return collect_statistics(image_score(amap, "max"), data["labels"], data["paths"], data["types"], amap,
                              data["masks"])


def rho_record(rows: list[dict], stats: list[tuple[Any, Any]]) -> dict[str, Any]:
    """ρ(validation, test) per metric over the rows, its 95 % bootstrap interval over both splits' images."""
    return {
        "rho": {m: spearman([r[f"val/{m}"] for r in rows], [r[f"test/{m}"] for r in rows]) for m in METRICS},
        "rho_ci95": {m: rank_correlation_interval(stats, m) for m in METRICS},
    }


def scores_of(amap: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    out = {"pixel_aupr": mf.average_precision(amap, masks), "pixel_aupro": mf.aupro(amap, masks)}
    out["image_auroc"] = mf.roc_auc(image_score(amap, "max"), labels)
    out["image_auroc_top"] = mf.roc_auc(image_score(amap, "top_mean", 0.01), labels)
    normal = labels == 0
    out["ring_ratio"] = ring_ratio(amap[normal]) if normal.any() else None
    return out


def fit(cfg, extra_callbacks: list) -> Any:


    L.seed_everything(cfg.seed, workers=True)
    datamodule, method = build(cfg)
    method.prepare_fit(datamodule)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=extra_callbacks, enable_checkpointing=False,
                          enable_progress_bar=False, _convert_="all")
    trainer.fit(method, datamodule=datamodule)
    return datamodule, method


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def check_cfa(
    dataset: str, epochs: Sequence[int], sigmas: Sequence[float], scores: Sequence[str], overrides: Sequence[str]
) -> dict:

    cfg = compose_train([f"dataset={dataset}", f"method.epochs={max(epochs)}", "logger=none", "selection.every_n_epochs=0",
                   "paths.output_dir=/tmp/texad-protocol-check", *overrides])
    start = time.time()
    snaps = Snapshots(epochs)
    datamodule, method = fit(cfg, [snaps])
    method.eval()
    rows, stats = [], []
    for epoch in sorted(snaps.states):
        method.model.heads.load_state_dict(snaps.states[epoch])
        method._calibrate()  # a calibrated method (method.calibration=location) calibrates these heads
        for rule in scores:
            method.model.heads["org"].scorer = SCORERS[rule]
            splits = {s: split_maps(method, getattr(datamodule, f"{s}_dataloader")()) for s in ("val", "test")}
            for sigma in sigmas:
                row: dict[str, Any] = {"epoch": epoch, "score": rule, "sigma": sigma}
                pair = []
                for s, data in splits.items():
                    amap = gaussian_blur2d(data["maps"]["org"], sigma)
                    row.update({f"{s}/{k}": v for k, v in scores_of(amap, data["masks"], data["labels"]).items()})
                    pair.append(statistics_of(amap, data))
                rows.append(row)
                stats.append(tuple(pair))
                log.info("%s %s", dataset, row)
    return {"kind": "cfa", "dataset": dataset, "rows": rows, "seconds": time.time() - start,
            **rho_record(rows, stats), "by_factor": by_factor(rows, ("epoch", "score", "sigma"))}


def by_factor(rows: list[dict], factors: Sequence[str]) -> dict[str, dict[str, dict[str, float | None]]]:
    """ρ(validation, test) within each level of each factor (e.g. over epochs × rules at σ = 4): where the
    agreement breaks."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for factor in factors:
        for level in dict.fromkeys(str(r[factor]) for r in rows):
            mine = [r for r in rows if str(r[factor]) == level]
            out.setdefault(factor, {})[level] = {
                m: spearman([r[f"val/{m}"] for r in mine], [r[f"test/{m}"] for r in mine]) for m in METRICS}
    return out


def check_spcfa_alpha(dataset: str, step: float, overrides: Sequence[str]) -> dict:
    cfg = compose_train([f"dataset={dataset}", "method=spcfa", "logger=none", "selection.every_n_epochs=0",
                   "method.view_cache=false", "paths.output_dir=/tmp/texad-protocol-check", *overrides])
    start = time.time()
    datamodule, method = fit(cfg, [])
    method.eval()
    splits = {s: split_maps(method, getattr(datamodule, f"{s}_dataloader")()) for s in ("val", "test")}
    views = method.model.view_names
    sigma = method.model.blur_sigma
    blurred = {s: {v: gaussian_blur2d(d["maps"][v], sigma) for v in views} for s, d in splits.items()}
    rows, stats = [], []
    for weights in simplex_grid(len(views), step):
        row: dict[str, Any] = {"alpha": [round(float(w), 4) for w in weights]}
        pair = []
        for s, data in splits.items():
            amap = sum(float(w) * blurred[s][v] for w, v in zip(weights, views))
            row.update({f"{s}/{k}": v for k, v in scores_of(amap, data["masks"], data["labels"]).items()})
            pair.append(statistics_of(amap, data))
        rows.append(row)
        stats.append(tuple(pair))
    return {"kind": "spcfa_alpha", "dataset": dataset, "views": views, "rows": rows, "seconds": time.time() - start,
            **rho_record(rows, stats)}


def markdown(results: list[dict]) -> str:
    lines = ["| set | settings | n | ρ P-AUPR (val↔test) [95 %] | ρ AUPRO (val↔test) [95 %] | time |",
             "|---|---|---|---|---|---|"]
    for r in results:
        what = "CFA epochs × score rule × σ" if r["kind"] == "cfa" else f"Sp-CFA α over views {r['views']}"
        rho = {}
        for m in METRICS:
            ci = (r.get("rho_ci95") or {}).get(m)
            rho[m] = ("–" if r["rho"][m] is None else f"{r['rho'][m]:.2f}") + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        lines.append(f"| {r['dataset']} | {what} | {len(r['rows'])} | {rho['pixel_aupr']} | {rho['pixel_aupro']} | "
                     f"{r['seconds']:.0f} s |")
    for r in results:
        for factor, levels in (r.get("by_factor") or {}).items():
            cells = ", ".join(f"{level}: " + " / ".join("–" if v is None else f"{v:.2f}" for v in rho.values())
                              for level, rho in levels.items())
            lines.append(f"\nρ P-AUPR / AUPRO within each {factor} ({r['dataset']}): {cells}")
    for r in results:
        lines += ["", f"### {r['dataset']} — {r['kind']}", ""]
        keys = [k for k in r["rows"][0] if "/" not in k]
        cols = [f"{s}/{m}" for m in (*METRICS, "image_auroc", "image_auroc_top", "ring_ratio") for s in ("val", "test")]
        lines.append("| " + " | ".join(keys + cols) + " |")
        lines.append("|" + "---|" * (len(keys) + len(cols)))
        for row in r["rows"]:
            cells = [str(row[k]) for k in keys] + [
                "–" if row.get(c) is None else f"{row[c]:.3f}" for c in cols
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m texad.tools.protocol_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["brick", "grass", "gravel"], help="embedded texture sets")
    parser.add_argument("--epochs", nargs="+", type=int, default=[1, 2, 5, 10, 30])
    parser.add_argument("--sigmas", nargs="+", type=float, default=[2.0, 4.0, 8.0])
    parser.add_argument("--scores", nargs="+", default=["softmin", "nearest"], help="CFA patch score rules")
    parser.add_argument("--spcfa", action="store_true", help="also the Sp-CFA α grid on a fixed pair of views")
    parser.add_argument("--alpha-step", type=float, default=0.1)
    parser.add_argument("--spcfa-override", action="append", default=[], help="overrides for the Sp-CFA run only")
    parser.add_argument("--no-cfa", action="store_true", help="skip the CFA epochs × σ check")
    parser.add_argument("--override", action="append", default=[], help="Hydra override for every run (repeatable)")
    parser.add_argument("--out", default="outputs/protocol_check", help="folder for protocol_check.json/.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    out = Path(args.out)
    results = []
    for name in args.sets:
        dataset = name if "/" in name else f"textures/{name}"
        if not args.no_cfa:
            results.append(check_cfa(dataset, args.epochs, args.sigmas, args.scores, args.override))
        if args.spcfa:
            results.append(check_spcfa_alpha(dataset, args.alpha_step, [*args.override, *args.spcfa_override]))
        write_json(out / "protocol_check.json", {"args": vars(args), "results": results})
    text = markdown(results)
    atomic_write(out / "protocol_check.md", lambda p: p.write_text(text + "\n"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
