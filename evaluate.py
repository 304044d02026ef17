"""Evaluate a trained texad checkpoint: `python evaluate.py ckpt_path=<run dir>/checkpoints/last.ckpt`."""

import hydra
from omegaconf import DictConfig

from texad.cli import run_job
from texad.pipeline import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    return run_job(evaluate, cfg)


if __name__ == "__main__":
    main()
