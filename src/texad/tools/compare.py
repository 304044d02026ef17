"""Compare the runs of a sweep without W&B: one table ranked by validation, seeds pooled, plots.

    python -m texad.tools.compare outputs/multirun/<date>/<time> [--sort val/pixel_aupr] [--ascending] [--out DIR]
    python -m texad.tools.compare --paired RUN_OR_FOLDER_A RUN_OR_FOLDER_B [--out DIR]

Each run dir of the sweep holds `.hydra/overrides.yaml` (what this job was given), `.hydra/config.yaml`
(its composed config: `optimized_metric`, `seed`) and, if it finished, `metrics.json`. Parameters whose
value differs between runs are the swept ones (with a single run, every override counts); the rest
are listed once as fixed.

Ranking: by default runs are sorted by the runs' own `optimized_metric` (a validation key,
`val/pixel_aupr` unless the sweep set another), with the test metrics in the columns beside it. A
test key may be given with --sort for reporting, with a warning: choosing a setting by a test
metric is selecting on the test set.

Seeds: runs that differ only in `seed` are one setting; `summary_seeds.csv` and the first table of
`summary.md` give each setting's mean ± sample standard deviation (ddof 1; empty for one run) per
metric and the number of runs, ranked by the mean of the sort metric.

Intervals: test metrics carry their 95 % bootstrap interval over the test images (metrics.json's `ci95`,
`texad.metrics.bootstrap`), shown as `[low, high]`; a setting's seeds get the interval of their mean.
`--paired A B` compares two runs (or two folders of runs, e.g. two methods' seeds) on the same test set:
per metric A − B and its paired 95 % interval, and whether it excludes 0.

Writes `summary.csv` (one row per run), `summary_seeds.csv` (when some setting has several seeds),
`summary.md` and `plots/<metric>__<param>.png` into the sweep dir (or --out), and prints the tables.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from texad.errors import TexadError
from texad.metrics.bootstrap import STATISTICS_FILE, TestStatistics, paired_differences
from texad.outputs import METRIC_KEYS, atomic_write
from texad.tools.stats import SEED_KEY, SeedPool, flatten_intervals, flatten_metrics
from texad.viz import metric_vs_param_figure, save_figure

DEFAULT_SORT = "val/pixel_aupr"  # train.yaml's optimized_metric
CLUSTERING_KEYS = ("nmi", "ari", "cluster_f1")


@dataclass
class RunRecord:
    """One job of a sweep: where it is, what it was given, what it measured (empty if it failed)."""

    run: str  # path relative to the sweep dir
    overrides: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    optimized_metric: str | None = None  # from the run's .hydra/config.yaml
    seed: Any = None  # the run's seed (config.yaml, else its override)
    intervals: dict[str, list[float]] = field(default_factory=dict)  # test metric → 95 % bootstrap interval
    path: Path | None = None  # the run dir

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


def is_test_metric(key: str) -> bool:
    """A metric measured on the test set (top-level pixel_*/image_*/clustering keys of metrics.json)."""
    if key.startswith("val/"):
        return False
    name = key.removeprefix("raw_")
    return name.startswith(("pixel_", "image_")) or name in CLUSTERING_KEYS


def test_sort_warning(key: str) -> str:
    return (
        f"ranking by {key!r}, a test metric: test metrics must not select a setting (that is selecting "
        f"on the test set); rank by validation, e.g. --sort val/{key.removeprefix('raw_')} "
        f"(the default is the runs' optimized_metric)"
    )


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's composed config (unresolved interpolations stay text); {} when absent or unreadable."""
    try:
        conf = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return conf if isinstance(conf, dict) else {}


def find_runs(sweep_dir: str | Path) -> list[RunRecord]:
    """Every run dir under `sweep_dir` (a dir with .hydra/overrides.yaml), in job order."""
    root = Path(sweep_dir)
    records = []
    for overrides_file in sorted(root.rglob(".hydra/overrides.yaml"), key=lambda p: _natural_key(str(p))):
        run_dir = overrides_file.parent.parent
        lines = yaml.safe_load(overrides_file.read_text()) or []
        overrides = dict(kv for kv in map(parse_override, lines) if kv is not None)
        metrics_file = run_dir / "metrics.json"
        record = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        conf = _read_run_config(run_dir)
        optimized = conf.get("optimized_metric")
        seed = conf.get(SEED_KEY, overrides.get(SEED_KEY))
        records.append(
            RunRecord(
                str(run_dir.relative_to(root)) if run_dir != root else ".", overrides, flatten_metrics(record),
                str(optimized) if optimized else None, seed, flatten_intervals(record), run_dir,
            )
        )
    return records


def selection_metric(runs: Sequence[RunRecord]) -> str:
    """The optimized_metric the runs were configured with (the most common one), else val/pixel_aupr."""
    keys = [r.optimized_metric for r in runs if r.optimized_metric]
    if not keys:
        return DEFAULT_SORT
    return max(dict.fromkeys(keys), key=keys.count)


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


def metric_columns(runs: Sequence[RunRecord], sort: str | None = None) -> list[str]:
    """The sort metric first, then the headline test metrics beside it, other test numbers, validation ones."""
    present: list[str] = []
    for r in runs:
        present += [k for k in r.metrics if k not in present]
    first = [sort] if sort in present else []
    head = [k for k in METRIC_KEYS if k in present and k not in first]
    rest = [k for k in present if k not in head and k not in first and not k.startswith("val/")]
    return first + head + rest + [k for k in present if k.startswith("val/") and k not in first]


def sort_runs(runs: Sequence[RunRecord], metric: str, ascending: bool = False) -> list[RunRecord]:
    """Best first by `metric`; runs without it (failed, or metric undefined) last, in job order."""
    have = [r for r in runs if metric in r.metrics]
    missing = [r for r in runs if metric not in r.metrics]
    return sorted(have, key=lambda r: r.metrics[metric], reverse=not ascending) + missing


@dataclass
class SeedGroup(SeedPool):
    """Runs that differ only in `seed`: one setting, several seeds."""

    params: dict[str, str]  # the swept values of this setting (seed excluded)
    runs: list[RunRecord]

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]

    @property
    def n_ok(self) -> int:
        return sum(1 for r in self.runs if r.metrics)

    def values(self, metric: str) -> list[float]:
        return [r.metrics[metric] for r in self.runs if metric in r.metrics]

    def run_dirs(self) -> list[Path]:
        return [r.path for r in self.runs if r.metrics and r.path]

    def interval(self, metric: str) -> list[float] | None:
        """95 % bootstrap interval of the seed mean; a single run's own (metrics.json's `ci95`)."""
        return self.runs[0].intervals.get(metric) if len(self.runs) == 1 else super().interval(metric)


def group_by_seed(runs: Sequence[RunRecord], params: Sequence[str]) -> list[SeedGroup]:
    """Runs grouped by every swept value except `seed`, in order of first appearance."""
    keys = [p for p in params if p != SEED_KEY]
    groups: dict[tuple, SeedGroup] = {}
    for r in runs:
        key = tuple(r.overrides.get(p) for p in keys)
        if key not in groups:
            groups[key] = SeedGroup({p: r.overrides.get(p, "") for p in keys}, [])
        groups[key].runs.append(r)
    return list(groups.values())


def sort_groups(groups: Sequence[SeedGroup], metric: str, ascending: bool = False) -> list[SeedGroup]:
    have = [g for g in groups if g.mean(metric) is not None]
    missing = [g for g in groups if g.mean(metric) is None]
    return sorted(have, key=lambda g: g.mean(metric), reverse=not ascending) + missing


@dataclass
class Summary:
    """The comparison table of a sweep."""

    sweep_dir: Path
    runs: list[RunRecord]  # best first
    params: list[str]
    fixed: dict[str, str]
    metrics: list[str]
    sort: str
    groups: list[SeedGroup] = field(default_factory=list)  # best first

    @property
    def columns(self) -> list[str]:
        return ["rank", "run", *self.params, *self.metrics, "status"]

    @property
    def has_seed_groups(self) -> bool:
        """True when some setting was run with several seeds (then the pooled table is shown)."""
        return any(len(g.runs) > 1 for g in self.groups)

    @property
    def group_params(self) -> list[str]:
        return [p for p in self.params if p != SEED_KEY]

    @property
    def group_columns(self) -> list[str]:
        cols = ["rank", *self.group_params, "n_runs", "seeds"]
        for m in self.metrics:
            cols += [f"{m}_mean", f"{m}_std"] + ([f"{m}_ci_low", f"{m}_ci_high"] if m in self.interval_metrics else [])
        return cols

    @property
    def interval_metrics(self) -> list[str]:
        """Metrics some run has a bootstrap interval for."""
        return [m for m in self.metrics if any(m in r.intervals for r in self.runs)]

    @property
    def csv_columns(self) -> list[str]:
        return [*self.columns[:-1], *(f"{m}_ci_{e}" for m in self.interval_metrics for e in ("low", "high")),
                "status"]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for i, r in enumerate(self.runs, 1):
            row: dict[str, Any] = {"rank": i, "run": r.run, "status": r.status}
            row.update({p: r.overrides.get(p, "") for p in self.params})
            row.update({m: r.metrics.get(m, "") for m in self.metrics})
            for m in self.interval_metrics:
                low, high = r.intervals.get(m) or ("", "")
                row[f"{m}_ci_low"], row[f"{m}_ci_high"] = low, high
            out.append(row)
        return out

    def group_rows(self) -> list[dict[str, Any]]:
        out = []
        for i, g in enumerate(self.groups, 1):
            row: dict[str, Any] = {"rank": i, **g.params, "n_runs": g.n_ok}
            row["seeds"] = " ".join(str(s) for s in g.seeds)
            for m in self.metrics:
                mean, std = g.mean(m), g.std(m)
                row[f"{m}_mean"] = "" if mean is None else mean
                row[f"{m}_std"] = "" if std is None else std
                if m in self.interval_metrics:
                    low, high = g.interval(m) or ("", "")
                    row[f"{m}_ci_low"], row[f"{m}_ci_high"] = low, high
            out.append(row)
        return out


def summarize(sweep_dir: str | Path, sort: str | None = None, ascending: bool = False) -> Summary:
    """The sweep's table; `sort` None ranks by the runs' optimized_metric (validation)."""
    runs = find_runs(sweep_dir)
    sort = sort or selection_metric(runs)
    params, fixed = swept_parameters(runs)
    metrics = metric_columns(runs, sort)
    groups = sort_groups(group_by_seed(runs, params), sort, ascending)
    return Summary(Path(sweep_dir), sort_runs(runs, sort, ascending), params, fixed, metrics, sort, groups)


# --- bootstrap intervals of seed groups, and paired comparisons (texad.metrics.bootstrap) ----------


def statistics_runs(folder: str | Path) -> list[Path]:
    """Run dirs with test statistics: `folder` itself, or every run below it (e.g. a method's seeds)."""
    root = Path(folder)
    if (root / STATISTICS_FILE).is_file():
        return [root]
    return sorted((p.parent for p in root.rglob(STATISTICS_FILE)), key=lambda p: _natural_key(str(p)))


def paired_table(a: str | Path, b: str | Path) -> tuple[list[dict[str, Any]], list[Path], list[Path]]:
    """Per metric, A − B (seed means) with its paired 95 % bootstrap interval; A and B are run dirs or
    folders of runs (seeds) on the same test images."""
    runs_a, runs_b = statistics_runs(a), statistics_runs(b)
    for name, runs in (("A", runs_a), ("B", runs_b)):
        if not runs:
            raise TexadError(f"{name}: no {STATISTICS_FILE} under {str(a if name == 'A' else b)!r} (a run dir of "
                             "texad, or a folder of them; runs older than the bootstrap need evaluate.py again)")
    diffs = paired_differences([TestStatistics.load(d / STATISTICS_FILE) for d in runs_a],
                               [TestStatistics.load(d / STATISTICS_FILE) for d in runs_b])
    rows = [{"metric": k, **v} for k, v in diffs.items()]
    return rows, runs_a, runs_b


def paired_markdown(rows: Sequence[dict[str, Any]], a: str | Path, b: str | Path, n_a: int, n_b: int) -> str:
    lines = [
        f"# A − B: A = `{a}` ({n_a} run{'s' * (n_a > 1)}), B = `{b}` ({n_b} run{'s' * (n_b > 1)})", "",
        "Paired bootstrap over the test images (both resampled with the same draws, normal and defective images "
        "apart); with several runs, the difference of their means. `differs`: the 95 % interval excludes 0.", "",
        "| metric | A | B | A − B | 95 % interval | differs |", "|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        interval = "" if r["low"] is None else f"[{r['low']:+.4f}, {r['high']:+.4f}]"
        differs = "" if r["excludes_zero"] is None else ("yes" if r["excludes_zero"] else "no")
        lines.append(f"| {r['metric']} | {r['a']:.4f} | {r['b']:.4f} | {r['difference']:+.4f} | {interval} | {differs} |")
    return "\n".join(lines) + "\n"


def _to_csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_csv(summary: Summary) -> str:
    return _to_csv(summary.csv_columns, summary.rows())


def seeds_to_csv(summary: Summary) -> str:
    return _to_csv(summary.group_columns, summary.group_rows())


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _mean_std_cell(mean: float | None, std: float | None, interval: list[float] | None = None) -> str:
    if mean is None:
        return ""
    text = _cell(mean) if std is None else f"{_cell(mean)} ± {_cell(std)}"
    return text + _interval_text(interval)


def _interval_text(interval: list[float] | None) -> str:
    return "" if not interval else f" [{interval[0]:.3f}, {interval[1]:.3f}]"


def _header(summary: Summary, col: str) -> str:
    return f"{col} (selection)" if col == summary.sort and not is_test_metric(col) else col


def sort_note(summary: Summary) -> str:
    if is_test_metric(summary.sort):
        return f"best first by `{summary.sort}`, a TEST metric: for reporting only, never select with it."
    return f"best first by `{summary.sort}` (validation); test metrics beside it are never used to rank."


def to_markdown(summary: Summary) -> str:
    lines = [f"# Sweep {summary.sweep_dir}", ""]
    if summary.fixed:
        lines += ["Fixed: " + ", ".join(f"`{k}={v}`" for k, v in summary.fixed.items()), ""]
    if summary.has_seed_groups:
        lines += [
            f"## {len(summary.groups)} settings, mean ± std over seeds",
            "",
            f"{sort_note(summary)} std: sample standard deviation (ddof 1) over the runs of a setting.",
            "",
        ]
        cols = [*summary.group_params, "n_runs", *summary.metrics]
        lines.append("| rank | " + " | ".join(_header(summary, c) for c in cols) + " |")
        lines.append("|---:|" + "|".join("---" if c in summary.group_params else "---:" for c in cols) + "|")
        for i, g in enumerate(summary.groups, 1):
            cells = [str(i), *(_cell(g.params[p]) for p in summary.group_params), str(g.n_ok)]
            cells += [_mean_std_cell(g.mean(m), g.std(m), g.interval(m) if m in summary.interval_metrics else None)
                      for m in summary.metrics]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"## {len(summary.runs)} runs", ""]
    else:
        lines += [f"{len(summary.runs)} runs, {sort_note(summary)}", ""]
    cols = summary.columns
    lines.append("| " + " | ".join(_header(summary, c) for c in cols) + " |")
    lines.append("|" + "|".join("---:" if c in summary.metrics or c == "rank" else "---" for c in cols) + "|")
    for run, row in zip(summary.runs, summary.rows()):
        lines.append("| " + " | ".join(_cell(row[c]) + (_interval_text(run.intervals.get(c)) if row[c] != "" else "")
                                       for c in cols) + " |")
    if summary.interval_metrics:
        lines += ["", "[low, high]: 95 % bootstrap interval over the test images (texad.metrics.bootstrap); for a "
                  "setting's seeds, the interval of their mean."]
    return "\n".join(lines) + "\n"


def write_summary(summary: Summary, out_dir: str | Path) -> tuple[Path, Path]:
    """summary.csv and summary.md in out_dir (and summary_seeds.csv when settings have several seeds)."""
    out = Path(out_dir)
    csv_text, md_text = to_csv(summary), to_markdown(summary)
    if summary.has_seed_groups:
        seeds_text = seeds_to_csv(summary)
        atomic_write(out / "summary_seeds.csv", lambda tmp: tmp.write_text(seeds_text))
    return (
        atomic_write(out / "summary.csv", lambda tmp: tmp.write_text(csv_text)),
        atomic_write(out / "summary.md", lambda tmp: tmp.write_text(md_text)),
    )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def write_plots(summary: Summary, out_dir: str | Path, metrics: Sequence[str] | None = None) -> list[Path]:
    """One PNG per (metric, swept parameter): plots/<metric>__<param>.png (seeds are pooled, not an axis)."""
    wanted = list(metrics) if metrics else [m for m in (summary.sort, *METRIC_KEYS) if m in summary.metrics]
    wanted = list(dict.fromkeys(wanted))
    params = summary.group_params if summary.has_seed_groups else summary.params
    paths = []
    for param in params:
        values = [typed(r.overrides[param]) if param in r.overrides else "(unset)" for r in summary.runs]
        for metric in wanted:
            scores = [r.metrics.get(metric) for r in summary.runs]
            best = next((i for i, s in enumerate(scores) if s is not None), None) if metric == summary.sort else None
            fig = metric_vs_param_figure(param, values, metric, scores, best_index=best)
            paths.append(save_figure(fig, Path(out_dir) / "plots" / f"{_safe(metric)}__{_safe(param)}.png"))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m texad.tools.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", nargs="?", help="a multirun dir, e.g. outputs/multirun/<date>/<time>")
    parser.add_argument("--paired", nargs=2, metavar=("A", "B"), default=None,
                        help="paired comparison of two runs, or two folders of runs (seeds), on the same test set: "
                        "A − B per metric with its 95 %% bootstrap interval")
    parser.add_argument(
        "--sort", default=None,
        help=f"metric to rank by (default: the runs' optimized_metric, {DEFAULT_SORT} unless set); "
        "a test key is allowed for reporting, with a warning",
    )
    parser.add_argument("--ascending", action="store_true", help="lower is better (e.g. wall_time_s)")
    parser.add_argument("--out", default=None, help="where summary.* and plots/ go (default: the sweep dir)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if args.paired:
        return _paired_main(*args.paired, args.out)
    if args.sweep_dir is None:
        parser.error("give a sweep dir, or --paired A B")
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        print(f"texad.compare: error: {str(sweep_dir)!r} is not a directory", file=sys.stderr)
        return 1
    summary = summarize(sweep_dir, args.sort, args.ascending)
    if not summary.runs:
        print(f"texad.compare: error: no runs (.hydra/overrides.yaml) under {str(sweep_dir)!r}", file=sys.stderr)
        return 1
    if is_test_metric(summary.sort):
        print(f"texad.compare: warning: {test_sort_warning(summary.sort)}", file=sys.stderr)
    if summary.sort not in summary.metrics:
        print(f"texad.compare: warning: no run has metric {summary.sort!r}; known: {summary.metrics}", file=sys.stderr)
    out_dir = Path(args.out) if args.out else sweep_dir
    csv_path, md_path = write_summary(summary, out_dir)
    plots = [] if args.no_plots else write_plots(summary, out_dir)
    print(to_markdown(summary))
    seeds = f", {out_dir / 'summary_seeds.csv'}" if summary.has_seed_groups else ""
    print(f"wrote {csv_path}{seeds}, {md_path} and {len(plots)} plots in {out_dir / 'plots'}")
    return 0


def _paired_main(a: str, b: str, out: str | None) -> int:
    try:
        rows, runs_a, runs_b = paired_table(a, b)
    except TexadError as err:
        print(f"texad.compare: error: {err}", file=sys.stderr)
        return 1
    text = paired_markdown(rows, a, b, len(runs_a), len(runs_b))
    print(text)
    if out:
        target = Path(out) / "paired.md"
        atomic_write(target, lambda tmp: tmp.write_text(text))
        atomic_write(Path(out) / "paired.csv", lambda tmp: tmp.write_text(
            _to_csv(["metric", "a", "b", "difference", "low", "high", "excludes_zero"], rows)))
        print(f"wrote {target} and {Path(out) / 'paired.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
