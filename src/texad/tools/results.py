"""The README's results table from one command: every method on the embedded texture sets, over seeds.

    python -m texad.tools.results [--sets textures/brick ...] [--seeds 0 1 2] [--methods cfa spcfa ...]
                            [--size 256] [--n-train 40] [--epochs N] [--jobs 2] [--override KEY=VALUE ...]
                            [--out outputs/results/<date-time>] [--table conf/results/default.yaml]

What runs comes from an editable table, `conf/results/default.yaml` (`--table` for another): the sets,
the seeds, and per method the train.py overrides, optionally an evaluate.py step on the trained
checkpoint (Sp-CFA: `fusion.search=grid`, α re-fused on validation) whose metrics.json is then the
run's result, and which table the method's row goes to (`main`, or `clustering` for defect-type
clustering). A method without `conf/method/<name>.yaml` is skipped with a printed line.

Each run is train.py in its own subprocess with `hydra.run.dir=<out>/runs/<method>/<set>/seed<k>`
(its output in `results.log` there); `--jobs N` (default: the table's `jobs`) runs N at a time, each
capped at cpu_count // N OMP/MKL threads, and an interrupted command kills the runs in progress. A run
whose final metrics.json exists is not run again, so a crashed or interrupted sweep goes on with the
same `--out`; a run dir made with other overrides is an
error rather than silently mixed in. `--override KEY=VALUE` goes to every train.py run,
`--override METHOD:KEY=VALUE` to that method's only.

Writes, atomically, into the output dir: `results.md` (also printed), `results.csv` (one row per
method and set: mean and sample standard deviation, ddof 1, over the seeds of every metric; n seeds;
wall time per run), `compact.md` (the README's table: five test metrics, mean ± std), `runs.csv` (one
row per run) and `plan.json` (what was asked). Wall time per run is the `wall_time_s` the job recorded in metrics.json (train.py's plus the evaluate.py step's), i.e.
without interpreter start-up.

Selection: every setting is a method default or chosen on validation inside its run (epoch selection,
α re-fusion); the table shows the validation metric each run selected on (its `optimized_metric`)
beside the test metrics, lists rows in the table's method order, and never ranks them: nothing here
reads a test metric to choose anything.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from texad.errors import TexadError
from texad.outputs import atomic_write, write_json
from texad.tools import ROOT
from texad.tools.stats import SeedPool, flatten_metrics, is_number

DEFAULT_TABLE = ROOT / "conf" / "results" / "default.yaml"
DEFAULT_SELECTION = "val/pixel_aupr"
EVAL_DIR = "evaluate"
LOG_NAME = "results.log"
_PER_METHOD = re.compile(r"^([A-Za-z_]\w*):(.+=.*)$")


@dataclass
class MethodEntry:
    """One row source of the table: a method, its overrides, an optional evaluate.py step."""

    name: str
    overrides: list[str] = field(default_factory=list)
    evaluate: list[str] = field(default_factory=list)
    table: str = "main"
    seeds: list[int] | None = None  # the method's own seeds (e.g. [0] for a deterministic one); None: the plan's


@dataclass
class Plan:
    sets: list[str]
    seeds: list[int]
    methods: list[MethodEntry]
    common: list[str]  # train.py overrides for every run
    tables: dict[str, list[str]]
    out: Path
    size: int | None = None  # dataset.image_size (and generated_size of texture sets)
    n_train: int | None = None  # dataset.n_train of texture sets
    jobs: int = 1  # runs at a time
    threads: int | None = None  # OMP/MKL threads per run (None: the environment's)
    skipped: list[str] = field(default_factory=list)  # printed lines: methods left out and why


@dataclass
class RunResult:
    method: str
    set: str
    seed: int
    run_dir: Path
    status: str  # ok | failed: ...
    metrics: dict[str, float] = field(default_factory=dict)
    selection: str = DEFAULT_SELECTION
    wall_time_s: float | None = None
    reused: bool = True  # its metrics.json was there before this command (a resumed sweep)
    final_dir: Path | None = None  # where its final metrics.json (and test_statistics.npz) are


# --------------------------------------------------------------------------------------- planning


def load_table(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TexadError(f"results table {str(path)!r} does not exist (expected a YAML like conf/results/default.yaml)")
    try:
        table = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise TexadError(f"results table {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(table, dict) or not isinstance(table.get("methods"), dict) or not table["methods"]:
        raise TexadError(f"results table {str(path)!r} needs a 'methods' mapping (name: {{overrides: [...]}})")
    return table


def method_entries(table: dict[str, Any], wanted: Sequence[str] | None) -> tuple[list[MethodEntry], list[str]]:
    """The table's methods (or `wanted`, in that order) that have a conf/method/<name>.yaml."""
    methods = table["methods"]
    names = list(wanted) if wanted else list(methods)
    entries, skipped = [], []
    for name in names:
        spec = methods.get(name)
        if spec is None and wanted:
            spec = {}  # a method not in the table runs with its defaults
        spec = spec or {}
        if not isinstance(spec, dict):
            raise TexadError(f"results table: method {name!r} needs a mapping (overrides: [...], evaluate: [...], table: ...)")
        if not (ROOT / "conf" / "method" / f"{name}.yaml").is_file():
            skipped.append(f"skipped method {name}: conf/method/{name}.yaml does not exist")
            continue
        own_seeds = spec.get("seeds")
        entries.append(MethodEntry(
            name, [str(o) for o in spec.get("overrides") or []], [str(o) for o in spec.get("evaluate") or []],
            str(spec.get("table", "main")), None if own_seeds is None else [int(k) for k in own_seeds],
        ))
    return entries, skipped


def trains(method: str) -> bool:
    """Whether `method.epochs` means anything for this method (its composed config has epochs > 0)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"method={method}", "paths.output_dir=."])
    finally:
        GlobalHydra.instance().clear()
    epochs = cfg.method.get("epochs")
    return isinstance(epochs, int) and epochs > 0


def size_overrides(set_name: str, size: int | None, n_train: int | None) -> list[str]:
    """--size sets the model input side (and, for generated texture sets, the generated side too)."""
    out = []
    generated = set_name.startswith("textures/")
    if size is not None:
        out += [f"dataset.generated_size={size}"] if generated else []
        out += [f"dataset.image_size={size}"]
    if n_train is not None:
        if not generated:
            raise TexadError(f"--n-train sets dataset.n_train of the generated texture sets; {set_name!r} is not one")
        out += [f"dataset.n_train={n_train}"]
    return out


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """'KEY=VALUE' for every method, 'METHOD:KEY=VALUE' for one."""
    common: list[str] = []
    per_method: dict[str, list[str]] = {}
    for text in overrides:
        match = _PER_METHOD.match(text)
        if match:
            per_method.setdefault(match.group(1), []).append(match.group(2))
        elif "=" in text:
            common.append(text)
        else:
            raise TexadError(f"--override {text!r}: expected KEY=VALUE or METHOD:KEY=VALUE")
    return common, per_method


def train_overrides(plan: Plan, entry: MethodEntry, set_name: str, seed: int) -> list[str]:
    """Everything train.py gets for one run, in a fixed order (compared with .hydra/overrides.yaml to resume)."""
    sizes = size_overrides(set_name, plan.size, plan.n_train)
    return [f"method={entry.name}", f"dataset={set_name}", f"seed={seed}", *plan.common, *sizes, *entry.overrides]


def run_dir_of(plan: Plan, method: str, set_name: str, seed: int) -> Path:
    return plan.out / "runs" / method / set_name / f"seed{seed}"


# ---------------------------------------------------------------------------------------- running


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _recorded_overrides(run_dir: Path) -> list[str] | None:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    return [str(x) for x in (yaml.safe_load(path.read_text()) or [])]


def _selection_key(run_dir: Path) -> str:
    try:
        conf = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return DEFAULT_SELECTION
    return str(conf.get("optimized_metric") or DEFAULT_SELECTION)


def _subprocess(args: list[str], log_path: Path, threads: int | None = None) -> tuple[int, str]:
    """Run one entry point; its output goes to log_path. Returns (exit status, last stderr-ish line).
    `threads` caps the run's intra-op threads (OMP/MKL), so parallel runs do not oversubscribe the cores."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = None
    if threads is not None:
        env = {**os.environ, **{k: str(threads) for k in THREAD_VARS}}
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(args)}\n")
        log.flush()
        with _LIVE_LOCK:
            if _STOPPING.is_set():
                raise SystemExit("texad.results: stopping")
            proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
            _LIVE.add(proc)
        try:
            proc.wait()
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
            if proc.poll() is None:  # interrupted while waiting (Ctrl-C, SIGTERM): no orphan run
                proc.kill()
                proc.wait()
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    return proc.returncode, (lines[-1] if lines else "")


def _entry_point(name: str) -> str:
    path = ROOT / name
    if not path.is_file():
        raise TexadError(f"python -m texad.tools.results runs {name} of the repository, but {str(path)!r} does not exist")
    return str(path)


NOT_RUN = "not run yet"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_LIVE: set[subprocess.Popen] = set()  # runs in progress, killed when the command is stopped
_LIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()


def _stop_live_runs() -> None:
    """Stop every run in progress and start no other (the command was interrupted)."""
    with _LIVE_LOCK:
        _STOPPING.set()
        for proc in _LIVE:
            proc.kill()


FIT_KEYS = ("selected_epoch", "epochs_run", "fit_time_s")  # kept from train.py's metrics.json after an evaluate step


def run_one(plan: Plan, entry: MethodEntry, set_name: str, seed: int, collect: bool = False) -> RunResult:
    """Train (and evaluate) one run unless its metrics.json is already there; read its result.
    With `collect`, nothing runs: a run without its final metrics.json is reported as not run yet."""
    run_dir = run_dir_of(plan, entry.name, set_name, seed)
    result = RunResult(entry.name, set_name, seed, run_dir, "ok")
    overrides = train_overrides(plan, entry, set_name, seed)
    recorded = _recorded_overrides(run_dir)
    if recorded is not None and recorded != overrides:
        raise TexadError(
            f"{str(run_dir)!r} was made with other overrides ({recorded}, now {overrides}); "
            f"give another --out or remove that run dir"
        )
    train_metrics = run_dir / "metrics.json"
    log_path = run_dir / LOG_NAME
    if not train_metrics.is_file() and collect:
        result.status = NOT_RUN
        return result
    if not train_metrics.is_file():
        result.reused = False
        code, last = _subprocess(
            [sys.executable, _entry_point("train.py"), *overrides, f"hydra.run.dir={run_dir}"], log_path,
            plan.threads,
        )
        if code != 0 or not train_metrics.is_file():
            result.status = f"failed (train.py exit {code}): {last}"
            return result
    final = train_metrics
    if entry.evaluate:
        final = run_dir / EVAL_DIR / "metrics.json"
        if not final.is_file() and collect:
            result.status = f"{NOT_RUN} (evaluate.py step)"
            return result
        if not final.is_file():
            result.reused = False
            # the run dir: evaluate.py takes the model train.py tested (best.ckpt, else last.ckpt)
            code, last = _subprocess(
                [sys.executable, _entry_point("evaluate.py"), f"ckpt_path={run_dir}", *entry.evaluate, "logger=none",
                 f"hydra.run.dir={run_dir / EVAL_DIR}"], log_path, plan.threads,
            )
            if code != 0 or not final.is_file():
                result.status = f"failed (evaluate.py exit {code}): {last}"
                return result
    fit = _read_json(train_metrics)
    record = _read_json(final)
    result.final_dir = final.parent
    if entry.evaluate:  # what only the fit knows comes from train.py's record
        record.update({k: fit[k] for k in FIT_KEYS if k in fit and k not in record})
    result.metrics = flatten_metrics(record)
    result.selection = _selection_key(run_dir)
    times = [fit.get("wall_time_s")]
    if entry.evaluate:
        times.append(record.get("wall_time_s"))
    result.wall_time_s = sum(float(t) for t in times) if all(is_number(t) for t in times) else None
    return result


# ------------------------------------------------------------------------------------ aggregation


@dataclass
class Row(SeedPool):
    """One method on one set: its runs over the seeds."""

    table: str
    method: str
    set: str
    runs: list[RunResult]

    @property
    def ok(self) -> list[RunResult]:
        return [r for r in self.runs if r.status == "ok"]

    @property
    def selection(self) -> str:
        keys = [r.selection for r in self.ok]
        return max(dict.fromkeys(keys), key=keys.count) if keys else DEFAULT_SELECTION

    def values(self, key: str) -> list[float]:
        if key == "wall_time_s":
            return [r.wall_time_s for r in self.ok if r.wall_time_s is not None]
        return [r.metrics[key] for r in self.ok if key in r.metrics]

    def run_dirs(self) -> list[Path]:
        return [r.final_dir for r in self.ok if r.final_dir is not None]


#: metrics where higher is better: the table marks, per set, the rows whose interval overlaps the best one's
RANKED = ("pixel_auroc", "pixel_aupro", "pixel_aupr", "pixel_f1", "pixel_f1_at_val", "pixel_aupimo", "image_auroc",
          "image_f1", "image_f1_at_val", "nmi", "ari", "cluster_f1")


def close_to_best(rows: Sequence[Row], key: str) -> tuple[Row | None, set[int]]:
    """The row with the best mean of `key` among `rows` (one set), and the ids of rows whose interval overlaps
    its interval: a difference the test set cannot tell from noise. Marks, never a ranking."""
    have = [r for r in rows if r.mean(key) is not None]
    if key not in RANKED or len(have) < 2:
        return None, set()
    best = max(have, key=lambda r: r.mean(key))
    ref = best.interval(key)
    if ref is None:
        return best, set()
    close = {id(r) for r in have if r is not best and r.interval(key) and r.interval(key)[1] >= ref[0]
             and r.interval(key)[0] <= ref[1]}
    return best, close


def build_rows(plan: Plan, results: Sequence[RunResult]) -> list[Row]:
    rows = []
    for entry in plan.methods:
        for set_name in plan.sets:
            runs = [r for r in results if r.method == entry.name and r.set == set_name]
            if runs:
                rows.append(Row(entry.table, entry.name, set_name, runs))
    return rows


def table_columns(plan: Plan, rows: Sequence[Row], table: str) -> list[str]:
    """The selection (validation) column first, then the table's metrics present in some run."""
    mine = [r for r in rows if r.table == table]
    selections = list(dict.fromkeys(r.selection for r in mine))
    wanted = plan.tables.get(table) or []
    present = [k for k in wanted if any(r.values(k) for r in mine)]
    return selections + [k for k in present if k not in selections]


def to_csv(plan: Plan, rows: Sequence[Row]) -> str:
    metric_keys: list[str] = []
    for table in dict.fromkeys(r.table for r in rows):
        metric_keys += [k for k in table_columns(plan, rows, table) if k not in metric_keys]
    metric_keys.append("wall_time_s")
    columns = ["table", "method", "set", "n_seeds", "seeds", "failed", "selection_metric"]
    for key in metric_keys:
        columns += [f"{key}_mean", f"{key}_std", f"{key}_ci_low", f"{key}_ci_high"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        out: dict[str, Any] = {
            "table": row.table, "method": row.method, "set": row.set, "n_seeds": len(row.ok),
            "seeds": " ".join(str(r.seed) for r in row.ok), "failed": len(row.runs) - len(row.ok),
            "selection_metric": row.selection,
        }
        for key in metric_keys:
            mean, std = row.mean(key), row.std(key)
            out[f"{key}_mean"] = "" if mean is None else mean
            out[f"{key}_std"] = "" if std is None else std
            low, high = row.interval(key) or ("", "")
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = low, high
        writer.writerow(out)
    return buf.getvalue()


def runs_to_csv(results: Sequence[RunResult]) -> str:
    keys: list[str] = []
    for r in results:
        keys += [k for k in r.metrics if k not in keys and k != "wall_time_s"]
    columns = ["method", "set", "seed", "status", "wall_time_s", "run_dir", *keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow({
            **{k: v for k, v in r.metrics.items() if k != "wall_time_s"},  # a step's own time: not the run's
            "method": r.method, "set": r.set, "seed": r.seed, "status": r.status, "run_dir": str(r.run_dir),
            "wall_time_s": "" if r.wall_time_s is None else r.wall_time_s,
        })
    return buf.getvalue()


def _fmt(value: float, key: str) -> str:
    if key in ("wall_time_s", "fit_time_s", "selected_epoch"):
        return f"{value:.1f}"
    return f"{value:.3f}"


def _cell(row: Row, key: str, mark: str = "") -> str:
    mean, std = row.mean(key), row.std(key)
    if mean is None:
        return "–"
    text = _fmt(mean, key) if std is None else f"{_fmt(mean, key)} ± {_fmt(std, key)}"
    interval = row.interval(key) if not key.startswith("val/") else None
    if interval:
        text += f" [{_fmt(interval[0], key)}, {_fmt(interval[1], key)}]"
    return f"**{text}**" if mark == "best" else text + (" ≈" if mark == "close" else "")


def _markdown_table(plan: Plan, rows: Sequence[Row], columns: Sequence[str], with_set: bool) -> list[str]:
    head = ["method", *(["set"] if with_set else []), "n", *columns, "wall time / run (s)"]
    labels = [f"{c} (selection)" if c.startswith("val/") else c for c in head]
    lines = ["| " + " | ".join(labels) + " |", "|" + "|".join("---" if h in ("method", "set") else "---:" for h in head) + "|"]
    marks: dict[tuple[int, str], str] = {}
    for key in columns:
        for set_name in dict.fromkeys(r.set for r in rows):
            best, close = close_to_best([r for r in rows if r.set == set_name], key)
            if best is not None:
                marks[(id(best), key)] = "best"
                marks.update({(i, key): "close" for i in close})
    for row in rows:
        cells = [row.method, *([row.set] if with_set else []), str(len(row.ok))]
        cells += [_cell(row, c, marks.get((id(row), c), "")) for c in columns] + [_cell(row, "wall_time_s")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


COMPACT_COLUMNS = {"pixel_auroc": "P-AUROC", "pixel_aupro": "AUPRO", "pixel_aupr": "P-AP", "pixel_f1": "P-F1",
                   "image_auroc": "I-AUROC"}


def _compact_cell(mean: float | None, std: float | None) -> str:
    return "–" if mean is None else f"{mean:.3f}" + ("" if std is None else f" ± {std:.3f}")


def to_compact_markdown(rows: Sequence[Row]) -> str:
    """The main table at a glance (the README's): set, method, five test metrics as mean ± std over the
    seeds; unmarked, so it stays ~110 characters wide (best per set, ≈ and the intervals: results.md)."""
    lines = ["| set | method | n | " + " | ".join(COMPACT_COLUMNS.values()) + " |", "|---|---|---:|" + "---:|" * len(COMPACT_COLUMNS)]
    main = [r for r in rows if r.table == "main"]
    for set_name in dict.fromkeys(r.set for r in main):
        for row in (r for r in main if r.set == set_name):
            cells = [_compact_cell(row.mean(key), row.std(key)) for key in COMPACT_COLUMNS]
            lines.append(f"| {set_name.split('/')[-1]} | {row.method} | {len(row.ok)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_markdown(plan: Plan, rows: Sequence[Row], results: Sequence[RunResult], command: str) -> str:
    lines = [
        "# texad results",
        "",
        f"`{command}`: sets {', '.join(plan.sets)}; seeds {' '.join(map(str, plan.seeds))}; "
        f"common overrides `{' '.join(plan.common) or '-'}`.",
        "",
        "Cells: mean ± sample standard deviation (ddof 1) over the n seeds that finished, then [the 95 % bootstrap "
        "interval of that mean over the test images] (texad.metrics.bootstrap). Test metrics, except "
        "the `val/…` (selection) column: the validation metric each run selected its settings on (epochs, "
        "Sp-CFA's α). Rows follow the table's method order; they are not ranked, and no test metric chose anything. "
        "Per set and metric, **bold** is the highest mean and ≈ marks the rows whose interval overlaps the bold one's: "
        "differences this test set cannot tell from noise (`python -m texad.tools.compare --paired` tests a pair).",
        "",
    ]
    main = [r for r in rows if r.table == "main"]
    for set_name in plan.sets:
        mine = [r for r in main if r.set == set_name]
        if mine:
            lines += [f"## {set_name}", ""] + _markdown_table(plan, mine, table_columns(plan, rows, "main"), False) + [""]
    for table in dict.fromkeys(r.table for r in rows if r.table != "main"):
        mine = [r for r in rows if r.table == table]
        lines += [f"## {table}", ""] + _markdown_table(plan, mine, table_columns(plan, rows, table), True) + [""]
    failed = [r for r in results if r.status != "ok"]
    notes = list(plan.skipped) + [f"{r.method} {r.set} seed {r.seed}: {r.status} ({r.run_dir / LOG_NAME})" for r in failed]
    if notes:
        lines += ["## Not in the table", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- cli


def make_plan(args: argparse.Namespace) -> Plan:
    table = load_table(args.table)
    entries, skipped = method_entries(table, args.methods)
    if not entries:
        raise TexadError("no method to run: " + "; ".join(skipped or ["the table lists none"]))
    common, per_method = split_overrides(args.override or [])
    unknown = sorted(set(per_method) - {e.name for e in entries})
    if unknown:
        raise TexadError(f"--override for method(s) {unknown} that are not run; running {[e.name for e in entries]}")
    sets = list(args.sets or table.get("sets") or [])
    seeds = [int(s) for s in (args.seeds if args.seeds is not None else table.get("seeds") or [0])]
    if not sets or not seeds:
        raise TexadError("python -m texad.tools.results needs at least one set and one seed")
    for entry in entries:
        entry.overrides += per_method.get(entry.name, [])
        if args.epochs is not None and trains(entry.name):
            entry.overrides.append(f"method.epochs={args.epochs}")
    out = Path(args.out) if args.out else Path("outputs") / "results" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    jobs = int(args.jobs if args.jobs is not None else table.get("jobs") or 1)
    if jobs < 1:
        raise TexadError(f"--jobs must be at least 1, got {jobs}")
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    return Plan(sets, seeds, entries, [str(o) for o in table.get("overrides") or []] + common,
                {k: list(v) for k, v in (table.get("tables") or {}).items()}, out.absolute(),
                (args.size if args.size is not None else table.get("size")) or None, args.n_train,
                jobs, threads, skipped)


def seeds_of(plan: Plan, entry: MethodEntry) -> list[int]:
    """The plan's seeds, or those of the method's `seeds` among them (a deterministic method runs once)."""
    if entry.seeds is None:
        return list(plan.seeds)
    return [k for k in plan.seeds if k in entry.seeds] or list(plan.seeds[:1])


def run_plan(plan: Plan, log=print, collect: bool = False) -> list[RunResult]:
    """Every run of the plan, `plan.jobs` at a time (each a subprocess); results in the plan's order."""
    jobs = [(e, s, k) for e in plan.methods for s in plan.sets for k in seeds_of(plan, e)]
    _STOPPING.clear()
    done = 0
    lock = threading.Lock()

    def one(entry: MethodEntry, set_name: str, seed: int) -> RunResult:
        nonlocal done
        started = time.time()
        result = run_one(plan, entry, set_name, seed, collect)
        took = time.time() - started
        sel = result.metrics.get(result.selection)
        what = "ok" if result.status == "ok" else result.status
        when = "metrics.json from before" if result.reused and result.status == "ok" else f"{took:.0f} s"
        detail = f", {result.selection} {sel:.4f}" if sel is not None else ""
        with lock:
            done += 1
            log(f"[{done}/{len(jobs)}] {entry.name} {set_name} seed {seed}: {what} ({when}{detail})")
        return result

    if plan.jobs <= 1 or collect:
        return [one(*job) for job in jobs]
    pool = ThreadPoolExecutor(max_workers=plan.jobs)
    try:
        return list(pool.map(lambda job: one(*job), jobs))
    except BaseException:
        _stop_live_runs()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_outputs(plan: Plan, results: Sequence[RunResult], command: str) -> tuple[Path, Path, str]:
    rows = build_rows(plan, results)
    md = to_markdown(plan, rows, results, command)
    csv_text, runs_text = to_csv(plan, rows), runs_to_csv(results)
    md_path = atomic_write(plan.out / "results.md", lambda tmp: tmp.write_text(md))
    csv_path = atomic_write(plan.out / "results.csv", lambda tmp: tmp.write_text(csv_text))
    atomic_write(plan.out / "runs.csv", lambda tmp: tmp.write_text(runs_text))
    compact = to_compact_markdown(rows)
    atomic_write(plan.out / "compact.md", lambda tmp: tmp.write_text(compact))
    return md_path, csv_path, md


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m texad.tools.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=None, help="data sets (default: the table's, textures/{brick,grass,gravel})")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: the table's, 0 1 2)")
    parser.add_argument("--methods", nargs="+", default=None, help="methods (default: every method of the table)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side (dataset.image_size; generated side too); default: the table's `size` "
                             "(128, so the default table fits an hour on 2 cores); 0 = each set's own (256)")
    parser.add_argument("--n-train", type=int, default=None, help="dataset.n_train of the generated texture sets")
    parser.add_argument("--epochs", type=int, default=None, help="method.epochs of the methods that train")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at a time (default: the table's `jobs`, else 1); with more than one, each run gets "
                             "cpu_count // jobs intra-op threads")
    parser.add_argument("--override", action="append", default=None,
                        help="KEY=VALUE for every train.py run, METHOD:KEY=VALUE for one method (repeatable)")
    parser.add_argument("--out", default=None, help="output dir (default outputs/results/<date-time>); reuse it to resume")
    parser.add_argument("--table", default=str(DEFAULT_TABLE), help="the methods table (YAML)")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: tabulate the runs of --out that have finished (e.g. while a long sweep "
                             "goes on, or after it was stopped); the others are listed as not run yet")
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM ends the command like Ctrl-C: subprocess.run then kills the run in progress (no orphan)."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if __name__ == "__main__":
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    command = " ".join(["python -m texad.tools.results", shlex.join(sys.argv[1:] if argv is None else list(argv))]).strip()
    try:
        plan = make_plan(args)
        for line in plan.skipped:
            print(f"texad.results: {line}")
        if args.collect and not (plan.out / "runs").is_dir():
            raise TexadError(f"--collect: {str(plan.out)!r} holds no runs (expected the --out of an earlier command)")
        plan.out.mkdir(parents=True, exist_ok=True)
        if not args.collect:
            write_json(plan.out / "plan.json", {
                "command": command, "sets": plan.sets, "seeds": plan.seeds, "common_overrides": plan.common,
                "size": plan.size, "n_train": args.n_train, "epochs": args.epochs, "jobs": plan.jobs,
                "threads_per_run": plan.threads,
                "methods": [vars(e) for e in plan.methods], "skipped": plan.skipped,
            })
        verb = "collected from" if args.collect else "into"
        print(f"texad.results: {sum(len(seeds_of(plan, e)) for e in plan.methods) * len(plan.sets)} runs {verb} {plan.out}")
        results = run_plan(plan, collect=args.collect)
        md_path, csv_path, md = write_outputs(plan, results, command)
    except TexadError as err:
        print(f"texad.results: error: {err}", file=sys.stderr)
        return 1
    print(md)
    print(f"wrote {md_path}, {csv_path} and {plan.out / 'runs.csv'}")
    missing = sum(r.status.startswith(NOT_RUN) for r in results)
    failed = sum(r.status != "ok" for r in results) - missing
    if missing:
        print(f"texad.results: {missing} run(s) not run yet (--collect ran nothing)", file=sys.stderr)
    if failed:
        print(f"texad.results: {failed} run(s) failed; run the same command with --out {plan.out} to retry them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
