"""Command-line tools around the entry points (`python -m texad.tools.<name>`): `results` (the results
table), `compare` (sweeps, paired comparisons), `bench` (speed and memory), `profile_fit` (CFA's fit per
stage), `cache` (the shared feature cache: info, clear), `protocol_check` (does validation rank like
test), `contact_sheet` (the test normals of a set), `clustering_study` (label-free choices of the clustering
method), `image_score_study` (CFA's image score chosen on validation); `sweep`
holds Hydra's multirun callbacks. Tools may import everything below them; nothing in texad imports a tool."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[3]  # the repository: train.py, evaluate.py, conf/
CONF_DIR = ROOT / "conf"


def compose_train(overrides: Sequence[str]):
    """conf/train.yaml composed with `overrides`, as train.py would see it (no run dir is made)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))
