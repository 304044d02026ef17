"""Per-sample files a run writes: a sample's file stem, an anomaly map as .npz, a CSV table.

Below the callback layer (`texad.writers`) so that methods (clustering's stored maps and clusters.csv)
and entry points use the same names and formats as the test-output callback without importing it.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from texad.outputs import atomic_write

log = logging.getLogger(__name__)

FLOAT16_MAX = float(np.finfo(np.float16).max)


def sample_name(path: str) -> str:
    """File stem of a sample (synthetic validation copies carry a '#synthetic-…' suffix)."""
    return Path(str(path).split("#", 1)[0]).stem


def save_map(path: str | Path, anomaly_map: np.ndarray, **extra: Any) -> Path:
    """An anomaly map as float16 .npz (`anomaly_map`), with scalars such as the image score."""
    amap = np.asarray(anomaly_map, dtype=np.float32)
    peak = float(np.abs(amap).max()) if amap.size else 0.0
    if peak > FLOAT16_MAX:
        log.warning("anomaly map %s exceeds the float16 range (%.3g); values are clipped", path, peak)
        amap = np.clip(amap, -FLOAT16_MAX, FLOAT16_MAX)
    arrays = {"anomaly_map": amap.astype(np.float16), **{k: np.asarray(v) for k, v in extra.items()}}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    return atomic_write(path, write)


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Rows (dicts) as CSV with the given columns, written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    text = buf.getvalue()
    return atomic_write(path, lambda tmp: tmp.write_text(text))
