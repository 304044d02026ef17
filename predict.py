"""Anomaly maps for a folder of new images: `python predict.py ckpt_path=<run dir> input_dir=<folder>`.

What it writes and how thresholds are found: `texad.predictor`.
"""

import hydra
from omegaconf import DictConfig

from texad.cli import run_job
from texad.predictor import predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> float | None:
    return run_job(predict, cfg)


if __name__ == "__main__":
    main()
