"""Auto-resume refuses a run dir's last.ckpt written under other settings (fast: a hand-made checkpoint)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, compose_cfg
from texad.errors import TexadError
from texad.pipeline import LAST_CKPT, resume_checkpoint


def write_last(tmp_path, overrides):
    cfg = compose_cfg("train", [*TINY, *overrides], tmp_path / "run")
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.save({"texad_config": OmegaConf.to_container(cfg, resolve=True), "state_dict": {}}, ckpt_dir / LAST_CKPT)
    return ckpt_dir


def test_the_same_settings_resume_and_more_epochs_may_follow(tmp_path):
    ckpt_dir = write_last(tmp_path, [])
    same = compose_cfg("train", TINY, tmp_path / "run")
    assert resume_checkpoint(same, ckpt_dir) == str(ckpt_dir / LAST_CKPT)
    longer = compose_cfg("train", [*TINY, "method.epochs=5"], tmp_path / "run")
    assert resume_checkpoint(longer, ckpt_dir) == str(ckpt_dir / LAST_CKPT)


@pytest.mark.parametrize("change, named", [("method.lr=0.002", "method.lr"), ("seed=3", "seed"),
                                           ("dataset=textures/brick", "dataset.name")])
def test_other_settings_are_refused_naming_what_differs(tmp_path, change, named):
    ckpt_dir = write_last(tmp_path, [])
    other = compose_cfg("train", [*TINY, change], tmp_path / "run")
    with pytest.raises(TexadError, match=rf"other settings \(.*{named}.*resume=false"):
        resume_checkpoint(other, ckpt_dir)
    assert resume_checkpoint(OmegaConf.merge(other, {"resume": False}), ckpt_dir) is None
