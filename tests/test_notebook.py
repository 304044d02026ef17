"""notebooks/inspect_runs.ipynb runs headless on two tiny runs and shows metrics, curves, overlays."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import ROOT, TINY, run_entry

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = ROOT / "notebooks" / "inspect_runs.ipynb"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("nb") / "multirun"
    overrides = [o for o in TINY if not o.startswith("method.epochs")]
    run_entry("train.py", "-m", *overrides, f"hydra.sweep.dir={out}",
              "eval_callbacks.test_outputs.max_overlays_per_type=1", "method.epochs=1,2")
    return [out / "0", out / "1"]


@pytest.mark.slow
def test_notebook_executes(two_runs, monkeypatch):
    monkeypatch.setenv("TEXAD_RUN_DIRS", os.pathsep.join(map(str, two_runs)))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = "\n".join(o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    assert "pixel_aupr" in markdown and "B − A" in markdown and str(two_runs[1]) in markdown
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # curves, overlays, score histogram, compared curves
