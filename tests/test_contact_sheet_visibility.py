"""texad.tools.contact_sheet (normals and per-type sheets with mask outlines) and defect_visibility."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from texad.data import embedded
from texad.data.embedded import ensure_texture_set
from texad.errors import TexadError
from texad.tools import contact_sheet, defect_visibility


def test_visibility_matches_a_brute_force_loop():
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (12, 14)).astype(np.uint8)
    image = clean.copy()
    mask = np.zeros((12, 14), bool)
    mask[4:7, 5:9] = True
    mask[7, 6] = True
    image[mask] = rng.integers(0, 256, int(mask.sum())).astype(np.uint8)
    width = 2
    inside, ring = [], []
    for y in range(12):
        for x in range(14):
            if mask[y, x]:
                inside.append(abs(float(image[y, x]) - float(clean[y, x])))
                continue
            near = any(mask[v, u] and (v - y) ** 2 + (u - x) ** 2 <= width**2
                       for v in range(12) for u in range(14))
            if near:
                ring.append(float(clean[y, x]))
    expected = np.mean(inside) / np.std(ring)
    assert defect_visibility.ring_of(mask, width).sum() == len(ring)
    assert defect_visibility.visibility(clean, image, mask, width) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(TexadError, match="non-empty mask"):
        defect_visibility.visibility(clean, image, np.zeros_like(mask), width)


def test_visibility_of_the_sets_own_defects_is_reproduced():
    # make_image is what the set writes: the measured image is the written image
    values = defect_visibility.measure("gravel", "crack", 2, 64)
    assert values.shape == (2,) and (values > 0).all()


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return ensure_texture_set("gravel", tmp_path_factory.mktemp("sets"), image_size=64, n_train=2, n_val_good=1,
                              n_test_good=3, n_per_type=2, defect_types=("hole", "scratch"))


def test_contact_sheet_of_normals(tiny_set):
    sheet = contact_sheet.contact_sheet(tiny_set / "test" / "good", columns=2, tile=40, title="t")
    assert sheet.dtype == np.uint8 and sheet.shape == (30 + 2 * (40 + 18), 2 * 40, 3)
    first = cv2.imread(str(tiny_set / "test" / "good" / "000.png"), cv2.IMREAD_COLOR)
    expected = cv2.resize(first, (38, 38), interpolation=cv2.INTER_AREA)
    assert np.array_equal(sheet[31:69, 1:39], expected)


def test_contact_sheet_of_a_defect_type_outlines_its_masks_at_1x(tiny_set):
    folder, masks = tiny_set / "test" / "hole", tiny_set / "ground_truth" / "hole"
    sheet = contact_sheet.contact_sheet(folder, columns=4, tile=66, masks=masks)
    assert sheet.shape == (66 + 18, 4 * 66, 3)  # two images, each plain and outlined
    image = cv2.imread(str(folder / "000.png"), cv2.IMREAD_COLOR)
    assert np.array_equal(sheet[1:65, 1:65], image)  # 1x: pixel for pixel
    outlined = sheet[1:65, 67:131]
    red = (outlined[..., 2] == 255) & (outlined[..., 0] == 0) & (outlined[..., 1] == 0)
    mask = cv2.imread(str(masks / "000_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert red.any() and (red <= mask).all()  # the outline runs on the mask's own border pixels
    with pytest.raises(TexadError, match="no mask"):
        contact_sheet.contact_sheet(folder, masks=tiny_set / "ground_truth" / "dent")


def test_contact_sheet_main_writes_a_sheet_per_type(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXAD_CACHE", str(tmp_path / "cache"))
    overrides = ["dataset.generated_size=64", "dataset.image_size=64", "dataset.n_train=2", "dataset.n_val_good=1",
                 "dataset.n_test_good=2", "dataset.n_per_type=1", f"dataset.cache_dir={tmp_path / 'cache'}"]
    argv = ["--sets", "textures/brick", "--out", str(tmp_path / "out"), "--defects"]
    for o in overrides:
        argv += ["--override", o]
    assert contact_sheet.main(argv) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["textures_brick.png"] + [f"textures_brick_{t}.png" for t in sorted(embedded.DEFECT_TYPES)]
    assert cv2.imread(str(tmp_path / "out" / "textures_brick_stain.png")).shape[1] == 8 * 66
