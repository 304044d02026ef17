"""Evaluate a trained texad checkpoint: `python evaluate.py ckpt_path=<run dir>` (its best.ckpt, else last.ckpt)."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from texad.cli import check_group_overrides, run_job
from texad.pipeline import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    return run_job(evaluate, cfg)


if __name__ == "__main__":
    check_group_overrides(sys.argv[1:], Path(__file__).parent / "conf")
    main()
