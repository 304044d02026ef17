"""The validation protocol: generators unlike the test defects, sizes as options, every generator present."""

from __future__ import annotations

from collections import Counter

import cv2
import numpy as np
import pytest
from hydra.errors import InstantiationException

from texad.data.embedded import load_texture
from texad.data.synthetic import (
    ALL_GENERATORS,
    DEFECT_TYPES,
    MAX_AREA_FRACTION,
    MIN_AREA_FRACTION,
    VALIDATION_ONLY,
    plant_defect,
)
from texad.errors import TexadError
from texad.pipeline import build


@pytest.mark.parametrize("generator", VALIDATION_ONLY)
@pytest.mark.parametrize("size", [32, 64, 128])
def test_validation_generators_change_only_masked_pixels(generator, size):
    texture = cv2.resize(load_texture("brick"), (size, size), interpolation=cv2.INTER_AREA)
    for seed in range(5):
        out, mask = plant_defect(texture, generator, np.random.default_rng(seed))
        changed = out != texture
        assert changed.any() and not (changed & ~mask).any()
        assert MIN_AREA_FRACTION <= mask.mean() <= MAX_AREA_FRACTION
        again = plant_defect(texture, generator, np.random.default_rng(seed))
        assert np.array_equal(out, again[0]) and np.array_equal(mask, again[1])


def test_perlin_region_is_not_a_blob_and_cutpaste_is_a_rectangle():
    texture = load_texture("gravel")[:128, :128].copy()
    _, mask = plant_defect(texture, "cutpaste", np.random.default_rng(0))
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert box == mask.sum()  # exactly its bounding rectangle
    _, mask = plant_defect(texture, "perlin", np.random.default_rng(0))
    n, _ = cv2.connectedComponents(mask.astype(np.uint8))
    ys, xs = np.nonzero(mask)
    assert mask.sum() < 0.9 * (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) or n - 1 > 1


def test_default_validation_has_every_generator_several_times(tiny_cfg):
    cfg = tiny_cfg("dataset=textures/brick", "dataset.n_train=40", "dataset.n_val_good=8")
    datamodule, _ = build(cfg)
    datamodule.setup("fit")
    val = datamodule.val_dataset()
    assert len(datamodule.val_samples) == 8
    counts = Counter(val.synthetic.values())
    assert set(counts) == set(ALL_GENERATORS) and set(VALIDATION_ONLY) <= set(counts)
    assert min(counts.values()) >= 3 and len(val) == 8 * (1 + 3)
    # one held-out normal's copies are of different kinds
    by_normal = [[val.synthetic[8 + i * 3 + c] for c in range(3)] for i in range(8)]
    assert all(len(set(kinds)) == 3 for kinds in by_normal)
    # validation never holds a training image
    assert not {s.path for s in datamodule.val_samples} & {s.path for s in datamodule.train_samples}


def test_validation_sizes_and_generators_are_options(tiny_cfg):
    cfg = tiny_cfg("dataset.n_train=10", "dataset.n_val_good=2", "dataset.val_copies=2",
                   "dataset.val_defects=[perlin,cutpaste]")
    datamodule, _ = build(cfg)
    datamodule.setup("fit")
    val = datamodule.val_dataset()
    assert Counter(val.synthetic.values()) == {"perlin": 2, "cutpaste": 2}
    # Hydra wraps errors raised while instantiating (the CLI prints the TexadError alone)
    with pytest.raises((TexadError, InstantiationException), match="dataset.val_defects"):
        build(tiny_cfg("dataset.val_defects=[dent]"))
    with pytest.raises((TexadError, InstantiationException), match="dataset.val_copies"):
        build(tiny_cfg("dataset.val_copies=0"))


def test_test_families_are_not_the_validation_only_generators():
    assert not set(VALIDATION_ONLY) & set(DEFECT_TYPES)
