"""Compare the runs of a sweep without W&B: one table, best first, and each metric against each swept value.

    python -m texad.compare outputs/multirun/<date>/<time> [--sort pixel_aupr] [--ascending] [--out DIR]

Each run dir of the sweep holds `.hydra/overrides.yaml` (what this job was given) and, if it
finished, `metrics.json`. Parameters whose value differs between runs are the swept ones (with a
single run, every override counts); the rest are listed once as fixed. Writes `summary.csv`,
`summary.md` and `plots/<metric>__<param>.png` into the sweep dir (or --out), and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from texad.outputs import METRIC_KEYS, atomic_write

DEFAULT_SORT = "pixel_aupr"


@dataclass
class RunRecord:
    """One job of a sweep: where it is, what it was given, what it measured (empty if it failed)."""

    run: str  # path relative to the sweep dir
    overrides: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "ok" if self.metrics else "no metrics.json"


def parse_override(text: str) -> tuple[str, str] | None:
    """'+a.b=1' → ('a.b', '1'); deletions ('~a') and malformed lines are not parameters."""
    text = str(text).strip()
    if text.startswith("~") or "=" not in text:
        return None
    key, value = text.split("=", 1)
    return key.lstrip("+"), value


def typed(value: str) -> Any:
    """An override's value as a number when it is one (for sorting and numeric axes), else the text."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
        return value
    return parsed


def flatten_metrics(record: dict[str, Any]) -> dict[str, float]:
    """Numeric entries of metrics.json; validation ones as 'val/<name>'."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "val" and isinstance(value, dict):
            out.update({f"val/{k}": float(v) for k, v in value.items() if _is_number(v)})
        elif _is_number(value):
            out[key] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def find_runs(sweep_dir: str | Path) -> list[RunRecord]:
    """Every run dir under `sweep_dir` (a dir with .hydra/overrides.yaml), in job order."""
    root = Path(sweep_dir)
    records = []
    for overrides_file in sorted(root.rglob(".hydra/overrides.yaml"), key=lambda p: _natural_key(str(p))):
        run_dir = overrides_file.parent.parent
        lines = yaml.safe_load(overrides_file.read_text()) or []
        overrides = dict(kv for kv in map(parse_override, lines) if kv is not None)
        metrics_file = run_dir / "metrics.json"
        metrics = flatten_metrics(json.loads(metrics_file.read_text())) if metrics_file.is_file() else {}
        records.append(RunRecord(str(run_dir.relative_to(root)) if run_dir != root else ".", overrides, metrics))
    return records


def swept_parameters(runs: Sequence[RunRecord]) -> tuple[list[str], dict[str, str]]:
    """(keys whose value differs between runs, {key: value} of those equal everywhere)."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.overrides if k not in keys]
    values = {k: {r.overrides.get(k) for r in runs} for k in keys}
    swept = [k for k in keys if len(values[k]) > 1]
    if len(runs) == 1 or not swept:
        return keys, {}
    return swept, {k: next(iter(values[k])) for k in keys if k not in swept}


def metric_columns(runs: Sequence[RunRecord]) -> list[str]:
    """The headline metrics first, then other test numbers, then validation ones."""
    present: list[str] = []
    for r in runs:
        present += [k for k in r.metrics if k not in present]
    head = [k for k in METRIC_KEYS if k in present]
    rest = [k for k in present if k not in head and not k.startswith("val/")]
    return head + rest + [k for k in present if k.startswith("val/")]


def sort_runs(runs: Sequence[RunRecord], metric: str, ascending: bool = False) -> list[RunRecord]:
    """Best first by `metric`; runs without it (failed, or metric undefined) last, in job order."""
    have = [r for r in runs if metric in r.metrics]
    missing = [r for r in runs if metric not in r.metrics]
    return sorted(have, key=lambda r: r.metrics[metric], reverse=not ascending) + missing


@dataclass
class Summary:
    """The comparison table of a sweep."""

    sweep_dir: Path
    runs: list[RunRecord]  # best first
    params: list[str]
    fixed: dict[str, str]
    metrics: list[str]
    sort: str

    @property
    def columns(self) -> list[str]:
        return ["rank", "run", *self.params, *self.metrics, "status"]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for i, r in enumerate(self.runs, 1):
            row: dict[str, Any] = {"rank": i, "run": r.run, "status": r.status}
            row.update({p: r.overrides.get(p, "") for p in self.params})
            row.update({m: r.metrics.get(m, "") for m in self.metrics})
            out.append(row)
        return out


def summarize(sweep_dir: str | Path, sort: str = DEFAULT_SORT, ascending: bool = False) -> Summary:
    runs = find_runs(sweep_dir)
    params, fixed = swept_parameters(runs)
    metrics = metric_columns(runs)
    return Summary(Path(sweep_dir), sort_runs(runs, sort, ascending), params, fixed, metrics, sort)


def to_csv(summary: Summary) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=summary.columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary.rows())
    return buf.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def to_markdown(summary: Summary) -> str:
    lines = [f"# Sweep {summary.sweep_dir}", "", f"{len(summary.runs)} runs, best first by `{summary.sort}`.", ""]
    if summary.fixed:
        lines += ["Fixed: " + ", ".join(f"`{k}={v}`" for k, v in summary.fixed.items()), ""]
    cols = summary.columns
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---:" if c in summary.metrics or c == "rank" else "---" for c in cols) + "|")
    for row in summary.rows():
        lines.append("| " + " | ".join(_cell(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_summary(summary: Summary, out_dir: str | Path) -> tuple[Path, Path]:
    """summary.csv and summary.md in out_dir."""
    out = Path(out_dir)
    csv_text, md_text = to_csv(summary), to_markdown(summary)
    return (
        atomic_write(out / "summary.csv", lambda tmp: tmp.write_text(csv_text)),
        atomic_write(out / "summary.md", lambda tmp: tmp.write_text(md_text)),
    )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def write_plots(summary: Summary, out_dir: str | Path, metrics: Sequence[str] | None = None) -> list[Path]:
    """One PNG per (metric, swept parameter): plots/<metric>__<param>.png."""
    from texad.viz import metric_vs_param_figure, save_figure

    wanted = list(metrics) if metrics else [m for m in (*METRIC_KEYS, summary.sort) if m in summary.metrics]
    wanted = list(dict.fromkeys(wanted))
    paths = []
    for param in summary.params:
        values = [typed(r.overrides[param]) if param in r.overrides else "(unset)" for r in summary.runs]
        for metric in wanted:
            scores = [r.metrics.get(metric) for r in summary.runs]
            best = next((i for i, s in enumerate(scores) if s is not None), None) if metric == summary.sort else None
            fig = metric_vs_param_figure(param, values, metric, scores, best_index=best)
            paths.append(save_figure(fig, Path(out_dir) / "plots" / f"{_safe(metric)}__{_safe(param)}.png"))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m texad.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun dir, e.g. outputs/multirun/<date>/<time>")
    parser.add_argument("--sort", default=DEFAULT_SORT, help=f"metric to rank by (default {DEFAULT_SORT}; e.g. val/pixel_aupr)")
    parser.add_argument("--ascending", action="store_true", help="lower is better (e.g. wall_time_s)")
    parser.add_argument("--out", default=None, help="where summary.* and plots/ go (default: the sweep dir)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        print(f"texad.compare: error: {str(sweep_dir)!r} is not a directory", file=sys.stderr)
        return 1
    summary = summarize(sweep_dir, args.sort, args.ascending)
    if not summary.runs:
        print(f"texad.compare: error: no runs (.hydra/overrides.yaml) under {str(sweep_dir)!r}", file=sys.stderr)
        return 1
    if args.sort not in summary.metrics:
        print(f"texad.compare: warning: no run has metric {args.sort!r}; known: {summary.metrics}", file=sys.stderr)
    out_dir = Path(args.out) if args.out else sweep_dir
    csv_path, md_path = write_summary(summary, out_dir)
    plots = [] if args.no_plots else write_plots(summary, out_dir)
    print(to_markdown(summary))
    print(f"wrote {csv_path}, {md_path} and {len(plots)} plots in {out_dir / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
