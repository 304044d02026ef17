"""What the results table and the sweep comparison both read from metrics.json, and how they pool seeds."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from texad.errors import TexadError
from texad.metrics.bootstrap import STATISTICS_FILE, TestStatistics, group_intervals

__all__ = ["SEED_KEY", "SeedPool", "flatten_intervals", "flatten_metrics", "group_interval_table", "is_number",
           "seed_mean", "seed_std"]

SEED_KEY = "seed"


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.json: test ones at the top level, validation ones as `val/<name>`, per-type
    image AUROC as `image_auroc_per_type/<type>`; the seed is which run, not a measurement."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == SEED_KEY:
            continue
        if key == "val" and isinstance(value, dict):
            out.update({f"val/{k}": float(v) for k, v in value.items() if is_number(v)})
        elif key == "image_auroc_per_type" and isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if is_number(v)})
        elif is_number(value):
            out[key] = float(value)
    return out


def flatten_intervals(record: dict[str, Any]) -> dict[str, list[float]]:
    """metrics.json's `ci95` (texad.metrics.bootstrap) as {metric: [low, high]}, named as `flatten_metrics`."""
    out: dict[str, list[float]] = {}
    for key, value in (record.get("ci95") or {}).items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items() if isinstance(v, list)})
        elif isinstance(value, list):
            out[key] = value
    return out


def seed_mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def seed_std(values: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof 1) over the seeds; None with fewer than two values."""
    return statistics.stdev(values) if len(values) > 1 else None


def group_interval_table(run_dirs: Sequence[Path]) -> dict[str, list[float]]:
    """95 % intervals of the mean over `run_dirs` (same test set, resampled alike), named as `flatten_metrics`;
    {} if a run lacks test_statistics.npz or the runs' test sets differ."""
    files = [Path(d) / STATISTICS_FILE for d in run_dirs]
    if not files or not all(f.is_file() for f in files):
        return {}
    try:
        table = group_intervals([TestStatistics.load(f) for f in files])
    except TexadError:
        return {}
    return {k: v for k, v in flatten_intervals({"ci95": table}).items() if v}


class SeedPool:
    """The runs of one setting over seeds: per metric the mean, the sample std and the 95 % bootstrap interval
    of the mean (every seed resampled with the same test images). Subclasses give `values` and `run_dirs`."""

    def values(self, key: str) -> list[float]:
        raise NotImplementedError

    def run_dirs(self) -> list[Path]:
        """Where the runs' test_statistics.npz are."""
        raise NotImplementedError

    def mean(self, key: str) -> float | None:
        return seed_mean(self.values(key))

    def std(self, key: str) -> float | None:
        """Sample standard deviation (ddof 1) over the seeds; None with fewer than two values."""
        return seed_std(self.values(key))

    def interval(self, key: str) -> list[float] | None:
        if getattr(self, "_interval_table", None) is None:
            self._interval_table = group_interval_table(self.run_dirs())
        return self._interval_table.get(key)
