"""Train a texad method, then validate and test it: `python train.py method=cfa dataset=textures/gravel`."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from texad.cli import check_group_overrides, run_job
from texad.pipeline import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_job(train, cfg)


if __name__ == "__main__":
    check_group_overrides(sys.argv[1:], Path(__file__).parent / "conf")
    main()
