"""Which image score should CFA use? Chosen on validation, reported on test (issue 20, point 6).

    python -m texad.tools.image_score_study RUN_DIR [RUN_DIR ...] [--rules max top_mean:0.002 ...] [--out DIR]

Each RUN_DIR is a trained CFA / Sp-CFA run (train.py's output dir). Its checkpoint is evaluated once
(validation and test, no files written there); the fused map at the trained α is then scored by every
rule of `texad.methods.components.image_score`: the map's maximum, or the mean of its top fraction of
pixels. Per run, the rule with the highest validation image AUROC is chosen (ties: the first listed);
its test image AUROC is reported with the 95 % bootstrap interval over test images, beside every other
rule's test figure for reference (never used to choose). The run's own rule must reproduce its test
pass's image AUROC: a check that the maps here are the ones the run scored.

Writes `<out>/image_score_study.json` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf

from texad.errors import TexadError
from texad.metrics import functional as mf
from texad.metrics.bootstrap import TestStatistics, intervals
from texad.methods.cfa.fusion import VIEWS, blur_views, fuse_blurred
from texad.methods.components.image_score import image_score
from texad.outputs import write_json
from texad.pipeline import build, checkpoint_file, load_checkpoint_config, run_evaluation

DEFAULT_RULES = ("max", "top_mean:0.002", "top_mean:0.01", "top_mean:0.05")


def parse_rule(text: str) -> tuple[str, float]:
    """'max' or 'top_mean:<fraction>' → (rule, fraction)."""
    name, _, fraction = text.partition(":")
    try:
        rule = (name, float(fraction) if fraction else 0.01)
        image_score(torch.zeros(1, 4), *rule)  # the rule's own checks, now
    except (ValueError, TexadError) as err:
        raise TexadError(f"--rules: {text!r} is not 'max' or 'top_mean:<fraction in (0, 1]>' ({err})") from err
    return rule


def fused_maps(run_dir: Path) -> tuple[dict[str, Any], tuple[str, float], float]:
    """Evaluate the run's checkpoint; the fused, blurred maps of validation and test at the trained α,
    with labels and paths, the run's own image rule and its test pass's image AUROC."""
    checkpoint, saved = load_checkpoint_config(checkpoint_file(run_dir))
    if saved["method"].get("name") not in ("cfa", "spcfa"):
        raise TexadError(f"{run_dir}: image_score_study needs a cfa or spcfa run, got {saved['method'].get('name')!r}")
    cfg = OmegaConf.create(saved)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.paths.output_dir = tmp
        cfg.logger = None
        cfg.eval_callbacks = None
        datamodule, method = build(cfg)
        method.load_method_state(checkpoint["state_dict"])
        results = run_evaluation(cfg, datamodule, method, [])
    alpha = dict(zip(VIEWS, (float(a) for a in method.hparams.alpha)))
    splits = {}
    for split in ("val", "test"):
        out = method.view_outputs.get(split)
        if out is None:
            raise TexadError(f"{run_dir}: no {split} maps (a validation split is needed to choose)")
        blurred = blur_views(out["maps"], float(method.hparams.blur_sigma))
        splits[split] = {"maps": fuse_blurred(blurred, alpha),
                         "labels": out["labels"].numpy().astype(int), "paths": list(out.get("paths") or []),
                         "types": list(out.get("types") or [])}
    own = (str(method.hparams.image_score), float(method.hparams.image_score_fraction))
    return splits, own, float(results["test"]["image_auroc"])


def study_run(run_dir: Path, rules: Sequence[tuple[str, float]]) -> dict[str, Any]:
    splits, own, reported = fused_maps(run_dir)
    own_scores = image_score(splits["test"]["maps"], *own).numpy()
    check = mf.roc_auc(own_scores, splits["test"]["labels"])
    if abs(check - reported) > 1e-6:
        raise TexadError(f"{run_dir}: the run's own rule {own} gives test image AUROC {check:.6f} here, "
                         f"its test pass {reported:.6f}: these are not the maps it scored")
    per_rule = []
    for rule in rules:
        row: dict[str, Any] = {"rule": f"{rule[0]}:{rule[1]:g}" if rule[0] != "max" else "max"}
        scores = {split: image_score(s["maps"], *rule).numpy() for split, s in splits.items()}
        for split, s in splits.items():
            row[f"{split}_image_auroc"] = float(mf.roc_auc(scores[split], s["labels"]))
        test = splits["test"]
        stats = TestStatistics(paths=test["paths"], labels=test["labels"],
                               defect_types=test["types"] or ["unknown"] * len(test["paths"]), scores=scores["test"])
        row["test_image_auroc_ci95"] = intervals(stats).get("image_auroc")
        per_rule.append(row)
    chosen = max(range(len(rules)), key=lambda i: (per_rule[i]["val_image_auroc"], -i))
    return {"run": str(run_dir), "own_rule": list(own), "own_test_image_auroc": reported,
            "chosen": per_rule[chosen]["rule"], "rules": per_rule}


def markdown(records: Sequence[dict[str, Any]]) -> str:
    names = [r["rule"] for r in records[0]["rules"]]
    lines = ["| run | chosen on val | test I-AUROC at chosen [95 %] | " + " | ".join(f"val / test {n}" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for rec in records:
        by = {r["rule"]: r for r in rec["rules"]}
        c = by[rec["chosen"]]
        ci = c["test_image_auroc_ci95"]
        ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        cells = [f"{by[n]['val_image_auroc']:.3f} / {by[n]['test_image_auroc']:.3f}" for n in names]
        lines.append(f"| {rec['run']} | {rec['chosen']} | {c['test_image_auroc']:.3f}{ci_text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m texad.tools.image_score_study", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="trained cfa / spcfa run dirs")
    parser.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES), help="max | top_mean:<fraction>")
    parser.add_argument("--out", type=Path, default=None, help="folder for image_score_study.json")
    args = parser.parse_args(argv)
    try:
        rules = [parse_rule(r) for r in args.rules]
        records = [study_run(run, rules) for run in args.runs]
    except TexadError as err:
        print(f"texad.image_score_study: error: {err}", file=sys.stderr)
        return 1
    table = markdown(records)
    print(table)
    if args.out is not None:
        path = write_json(args.out / "image_score_study.json", {"rules": args.rules, "runs": records})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
