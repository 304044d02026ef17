"""Clustering consumes its localisers through the public `Localizer` protocol (methods/base.py): a change
to a localiser's own training reaches clustering's maps (no copied training loop to fall behind)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, compose_cfg
from texad.methods.base import AnomalyModule, Localizer
from texad.methods.blind_vae.lightning_model import BlindVAEMethod
from texad.methods.cfa.lightning_model import CFA
from texad.methods.fca.lightning_model import FCAMethod
from texad.pipeline import build

CLUSTERING = [*TINY, "method=clustering", "method.n_clusters=oracle", "method.fca.feature_input_size=128",
              "method.blind_vae.feature_input_size=128", "method.blind_vae.max_steps=3", "method.cfa.epochs=1",
              "method.selection.enabled=false", "method.epochs=1"]


def test_fca_cfa_and_blind_vae_are_localizers():
    for cls in (FCAMethod, CFA, BlindVAEMethod):
        assert issubclass(cls, AnomalyModule)
        assert callable(getattr(cls, "fit_on")) and callable(getattr(cls, "predict_maps"))
    assert isinstance(FCAMethod.__new__(FCAMethod), Localizer)


def clustering_maps(tmp_path, source: str) -> torch.Tensor:
    """The maps clustering attends to for the test images, after its prepare_fit fitted the localiser."""
    torch.manual_seed(0)
    datamodule, method = build(compose_cfg("train", [*CLUSTERING, f"method.maps_from={source}"], tmp_path / source))
    method.prepare_fit(datamodule)
    with torch.no_grad():
        return torch.cat([method.predict_maps(batch)["anomaly_map"] for batch in datamodule.test_dataloader()])


@pytest.mark.slow
@pytest.mark.parametrize("source, cls", [("blind_vae", BlindVAEMethod), ("cfa", CFA)])
def test_a_change_to_the_localizers_training_step_changes_clusterings_maps(tmp_path, monkeypatch, one_thread,
                                                                          source, cls):
    trained = clustering_maps(tmp_path / "a", source)
    again = clustering_maps(tmp_path / "b", source)
    assert torch.equal(trained, again)  # deterministic: a difference below comes from the patch alone
    original = cls.training_step

    def frozen_step(self, batch, batch_idx):  # the localiser's training changed: its loss no longer moves it
        return original(self, batch, batch_idx) * 0.0

    monkeypatch.setattr(cls, "training_step", frozen_step)
    untrained = clustering_maps(tmp_path / "c", source)
    assert not torch.allclose(untrained, trained, atol=1e-6)
