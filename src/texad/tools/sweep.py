"""Hydra callbacks around a multirun (registered in conf/hydra/default.yaml under `hydra.callbacks`).

- `SummaryCallback`: when the sweep ends, `summary.csv` (and `summary.md`, `summary_seeds.csv`) at
  the multirun root, one row per run with its swept values and all its metrics, ranked by the runs'
  validation `optimized_metric` (the tables of `texad.compare`).
- `WandbGroupCallback`: the jobs of one multirun share a W&B group named after the sweep dir, through
  `WANDB_RUN_GROUP` (read by conf/logger/wandb.yaml); a group the user set is left alone.

This module is imported by Hydra at every start, so it imports nothing heavy at the top.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

GROUP_ENV = "WANDB_RUN_GROUP"
MAX_GROUP_CHARS = 128  # W&B's limit on a group name


def sweep_group_name(sweep_dir: str | Path) -> str:
    """The sweep dir as given (e.g. 'outputs/multirun/2026-11-26/10-00-00'), its tail if too long."""
    text = str(sweep_dir).rstrip("/")
    return text[-MAX_GROUP_CHARS:]


class SummaryCallback(Callback):
    """Writes summary.csv / summary.md at the multirun root when all jobs are done.

    `sort` None (the default) ranks by the runs' own `optimized_metric`, a validation key; a test key
    is honoured with a warning (a test metric must not select a setting).
    """

    def __init__(self, sort: str | None = None, ascending: bool = False) -> None:
        self.sort, self.ascending = sort, ascending

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # imported when a sweep ends, not at every Hydra start-up (this module is loaded by every run)
        from texad.tools.compare import is_test_metric, summarize, test_sort_warning, write_summary

        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        if self.sort and is_test_metric(self.sort):
            log.warning("sweep summary: %s", test_sort_warning(self.sort))
        try:
            summary = summarize(sweep_dir, self.sort, self.ascending)
            if summary.runs:
                csv_path, _ = write_summary(summary, sweep_dir)
                log.info("sweep summary (%d runs): %s", len(summary.runs), csv_path)
        except Exception as err:  # a summary must never turn a finished sweep into a failure
            log.warning("could not write the sweep summary in %s: %s", sweep_dir, err)


class WandbGroupCallback(Callback):
    """Sets WANDB_RUN_GROUP to the sweep dir for the jobs of a multirun (unless already set)."""

    def __init__(self) -> None:
        self._set_by_us = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get(GROUP_ENV):
            return
        os.environ[GROUP_ENV] = sweep_group_name(config.hydra.sweep.dir)
        self._set_by_us = True

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._set_by_us:
            os.environ.pop(GROUP_ENV, None)
            self._set_by_us = False
