"""Shared test helpers: tiny configs composed in-process, and real entry points as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# one cache for the whole session (generated embedded sets are reused), never the user's own
os.environ.setdefault("TEXAD_CACHE", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"texad-test-cache-{os.getuid()}"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

TINY = [
    "dataset.generated_size=64",
    "dataset.image_size=64",
    "dataset.n_train=6",
    "dataset.n_val_good=2",
    "dataset.n_test_good=2",
    "dataset.n_per_type=2",
    "dataset.eval_batch_size=4",
    "method.epochs=2",
    "trainer.enable_progress_bar=false",
    "logger=none",
]


def compose_cfg(config_name: str, overrides: list[str], output_dir: Path):
    """A composed config as train.py would see it, with the run dir set to output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=[*overrides, f"paths.output_dir={output_dir}"])


def run_entry(script: str, *overrides: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run train.py / evaluate.py / predict.py as a user would."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*overrides: str, config_name: str = "train"):
        return compose_cfg(config_name, [*TINY, *overrides], tmp_path / "run")

    return make


@pytest.fixture
def one_thread():
    """Small tensors: one torch thread avoids oversubscription stalls on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
