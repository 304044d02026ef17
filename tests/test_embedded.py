"""The shipped data sets: synthetic defects with exact masks, texture sets and ELPV in MVTec layout."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from texad.data import embedded
from texad.data.embedded import MARKER, TEXTURES, ensure_elpv_set, ensure_texture_set, load_texture
from texad.data.synthetic import DEFECT_TYPES, MAX_AREA_FRACTION, MIN_AREA_FRACTION, plant_defect
from texad.errors import TexadError

SMALL = dict(image_size=64, n_train=4, n_val_good=2, n_test_good=2, n_per_type=2)


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def brick_set(tmp_path_factory):
    return ensure_texture_set("brick", tmp_path_factory.mktemp("sets"), **SMALL)


# --- plant_defect -------------------------------------------------------------------------------


@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
@pytest.mark.parametrize("size", [32, 45, 96])
def test_defect_changes_only_masked_pixels_and_covers_allowed_area(defect_type, size):
    texture = cv2.resize(load_texture("gravel"), (size, size), interpolation=cv2.INTER_AREA)
    for seed in range(6):
        out, mask = plant_defect(texture, defect_type, np.random.default_rng(seed))
        assert out.shape == texture.shape and out.dtype == np.uint8
        assert mask.shape == texture.shape and mask.dtype == bool
        changed = out != texture
        assert changed.any()
        assert not (changed & ~mask).any()
        assert MIN_AREA_FRACTION <= mask.mean() <= MAX_AREA_FRACTION
        margin = max(2, round(0.08 * size))
        assert not mask[:margin].any() and not mask[-margin:].any()
        assert not mask[:, :margin].any() and not mask[:, -margin:].any()


@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
def test_defect_on_rgb_and_non_square_images(defect_type):
    rng = np.random.default_rng(1)
    image = rng.integers(60, 200, size=(48, 80, 3), dtype=np.uint8)
    out, mask = plant_defect(image, defect_type, np.random.default_rng(7))
    assert out.shape == image.shape and mask.shape == (48, 80)
    assert not ((out != image).any(axis=2) & ~mask).any()
    assert (out != image).any()


def test_defect_is_reproducible_and_leaves_input_alone():
    image = load_texture("grass")[:128, :128].copy()
    before = image.copy()
    a = plant_defect(image, "foreign", np.random.default_rng(3))
    b = plant_defect(image, "foreign", np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.array_equal(image, before)


def test_defect_rejects_unknown_type_and_bad_images():
    image = np.zeros((64, 64), np.uint8)
    with pytest.raises(TexadError, match="scratch"):
        plant_defect(image, "dent", np.random.default_rng(0))
    with pytest.raises(TexadError, match="at least 32"):
        plant_defect(np.zeros((16, 64), np.uint8), "stain", np.random.default_rng(0))
    with pytest.raises(TexadError, match="uint8"):
        plant_defect(np.zeros((64, 64), np.float32), "stain", np.random.default_rng(0))


def test_defect_on_flat_image_is_still_visible():
    image = np.full((64, 64), 128, np.uint8)
    for defect_type in DEFECT_TYPES:
        out, mask = plant_defect(image, defect_type, np.random.default_rng(0))
        assert (out != image).any() and not ((out != image) & ~mask).any()


# --- texture sets -------------------------------------------------------------------------------


def test_texture_set_layout(brick_set):
    assert brick_set.name == "brick"
    top = {p.name for p in brick_set.iterdir()}
    assert top == {"train", "val", "test", "ground_truth", MARKER}
    assert sorted(p.name for p in (brick_set / "train").iterdir()) == ["good"]
    assert len(list((brick_set / "val" / "good").glob("*.png"))) == 2
    assert sorted(p.name for p in (brick_set / "test").iterdir()) == sorted(["good", *DEFECT_TYPES])
    assert sorted(p.name for p in (brick_set / "ground_truth").iterdir()) == sorted(DEFECT_TYPES)
    assert len(list((brick_set / "train" / "good").glob("*.png"))) == 4
    assert len(list((brick_set / "test" / "good").glob("*.png"))) == 2
    for path in (brick_set / "train" / "good").glob("*.png"):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image.shape == (64, 64) and image.dtype == np.uint8
    for defect_type in DEFECT_TYPES:
        images = sorted((brick_set / "test" / defect_type).glob("*.png"))
        masks = sorted((brick_set / "ground_truth" / defect_type).glob("*.png"))
        assert len(images) == 2
        assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images]
        for image_path, mask_path in zip(images, masks):
            image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
            mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
            assert mask.shape == image.shape == (64, 64) and mask.dtype == np.uint8
            assert set(np.unique(mask)) == {0, 255}


def test_texture_set_reads_with_mvtec_reader(brick_set):
    from texad.data import layout  # texad's own module: a broken import must fail, not skip

    split = layout.read_mvtec_layout(brick_set)
    assert split.has_masks and len(split.train) == 4 and len(split.val) == 2
    assert split.defect_types == sorted(DEFECT_TYPES)


def _pixels_seen(folders, n=60):
    """Photo pixels (flat indices) that the first `n` crops of each folder cover, per split."""
    side = embedded.SOURCE_SIDE
    # a "photo" whose every pixel holds its own flat index: a crop tells which pixels it came from
    photo = np.arange(side * side, dtype=np.float64).reshape(side, side)
    seen: dict[str, set[int]] = {}
    for folder in folders:
        for index in range(n):
            rng = embedded._image_rng(0, "gravel", folder, index)
            crop = embedded._random_crop(photo, embedded.region_of(folder), embedded.CROP_SIDE, rng)
            seen.setdefault(folder.split("/")[0], set()).update(np.unique(crop).astype(np.int64).tolist())
    return seen


def test_splits_are_disjoint_in_pixels_and_each_spans_every_row():
    seen = _pixels_seen(("train/good", "val/good", "test/good", "test/hole"))
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]
    side = embedded.SOURCE_SIDE
    for name, pixels in seen.items():
        boxes = embedded.REGIONS["test" if name == "test" else f"{name}/good"]
        inside = np.zeros((side, side), bool)
        for top, bottom, left, right in boxes:
            inside[top:bottom, left:right] = True
        assert inside.any(axis=1).all(), name  # the split's rectangles cover every row of the photo
        assert inside.ravel()[sorted(pixels)].all(), name  # and its crops stay inside them
        rows = np.array(sorted(pixels)) // side
        assert set((rows // 128).tolist()) == {0, 1, 2, 3}, name  # 60 crops reach every quarter of the rows
        assert len(set(rows.tolist())) > 0.9 * side, name


def test_layout_rectangles_are_disjoint_between_splits_in_every_version():
    for layout, regions in embedded.LAYOUTS.items():
        owner = np.full((embedded.SOURCE_SIDE, embedded.SOURCE_SIDE), -1)
        for k, boxes in enumerate(regions.values()):
            for top, bottom, left, right in boxes:
                assert (owner[top:bottom, left:right] == -1).all(), (layout, boxes)
                owner[top:bottom, left:right] = k
        assert embedded.crop_positions(regions["test"]) and min(embedded.crop_positions(regions["test"])) > 0


def test_crop_corner_is_uniform_over_every_position():
    boxes = ((0, 130, 0, 129), (200, 328, 300, 430))  # 3 × 2 and 1 × 3 positions
    assert embedded.crop_positions(boxes) == [6, 3]
    rng = np.random.default_rng(0)
    corners = [embedded.crop_corner(boxes, rng) for _ in range(9000)]
    expected = {(y, x) for y in range(3) for x in range(2)} | {(200, x) for x in range(300, 303)}
    counts = {c: corners.count(c) for c in set(corners)}
    assert set(counts) == expected
    assert all(abs(n - 1000) < 150 for n in counts.values()), counts
    with pytest.raises(TexadError, match="no 128 px crop fits"):
        embedded.crop_corner(((0, 100, 0, 512),), rng)


def test_version_bump_rebuilds_a_version_2_set(tmp_path):
    folder = ensure_texture_set("gravel", tmp_path, **SMALL)
    marker = json.loads((folder / MARKER).read_text())
    assert marker["generator_version"] == embedded.GENERATOR_VERSION == 3
    marker["generator_version"] = 2
    (folder / MARKER).write_text(json.dumps(marker))
    assert embedded._marker_params(folder, embedded.GENERATOR_VERSION) is None  # a v2 set is not reused
    ensure_texture_set("gravel", tmp_path, **SMALL)
    assert json.loads((folder / MARKER).read_text())["generator_version"] == 3


def test_validation_normals_of_the_set_replace_the_hold_out(tmp_path):
    from texad.data.datamodule import TextureDataModule

    common = dict(texture="brick", cache_dir=str(tmp_path), generated_size=64, image_size=64, n_train=6,
                  n_test_good=2, n_per_type=1, val_fraction=0.5)
    own = TextureDataModule(n_val_good=3, **common)
    own.setup()
    assert len(own.train_samples) == 6 and len(own.val_samples) == 3
    assert all("/val/good/" in str(s.path) for s in own.val_samples)
    held_out = TextureDataModule(n_val_good=0, **common)
    held_out.setup()
    assert len(held_out.train_samples) == 3 and len(held_out.val_samples) == 3
    assert all("/train/good/" in str(s.path) for s in held_out.val_samples)


def test_texture_set_is_byte_identical_across_folders(tmp_path):
    a = ensure_texture_set("gravel", tmp_path / "a", **SMALL)
    b = ensure_texture_set("gravel", tmp_path / "b", **SMALL)
    assert files_of(a) == files_of(b)


def test_texture_set_second_call_reuses_the_folder(brick_set, monkeypatch):
    stamps = {p: p.stat().st_mtime_ns for p in brick_set.rglob("*")}

    def must_not_build(*args, **kwargs):
        raise AssertionError("rebuilt a complete set")

    monkeypatch.setattr(embedded, "_build_texture_set", must_not_build)
    assert ensure_texture_set("brick", brick_set.parent, **SMALL) == brick_set
    assert {p: p.stat().st_mtime_ns for p in brick_set.rglob("*")} == stamps


def test_texture_set_other_parameters_rebuild_in_place(tmp_path):
    first = ensure_texture_set("grass", tmp_path, **SMALL)
    tests_before = files_of(first / "test")
    second = ensure_texture_set("grass", tmp_path, **{**SMALL, "n_train": 6})
    assert second == first
    assert len(list((second / "train" / "good").glob("*.png"))) == 6
    assert files_of(second / "test") == tests_before  # per-image seeds: more training images, same test set
    assert json.loads((second / MARKER).read_text())["params"]["n_train"] == 6
    assert {p.name for p in tmp_path.iterdir()} - {".grass.lock"} == {"grass"}  # no leftover temp folders


def test_texture_set_subset_of_defect_types(tmp_path):
    folder = ensure_texture_set("gravel", tmp_path, **SMALL, defect_types=("hole", "scratch"))
    assert sorted(p.name for p in (folder / "test").iterdir()) == ["good", "hole", "scratch"]
    with pytest.raises(TexadError, match="unknown defect types"):
        ensure_texture_set("gravel", tmp_path, **SMALL, defect_types=("dent",))


def test_interrupted_generation_leaves_no_complete_looking_set(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = embedded.plant_defect

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(embedded, "plant_defect", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        ensure_texture_set("brick", tmp_path, **SMALL)
    assert not (tmp_path / "brick").exists()
    assert not list(tmp_path.glob(".brick.partial-*"))
    monkeypatch.setattr(embedded, "plant_defect", real)
    assert (ensure_texture_set("brick", tmp_path, **SMALL) / MARKER).is_file()


def test_texture_set_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "brick").mkdir()
    (tmp_path / "brick" / "mine.txt").write_text("user data")
    with pytest.raises(TexadError, match="not generated by texad"):
        ensure_texture_set("brick", tmp_path, **SMALL)
    assert (tmp_path / "brick" / "mine.txt").is_file()


def test_texture_set_rejects_bad_arguments(tmp_path):
    with pytest.raises(TexadError, match=", ".join(TEXTURES)):
        ensure_texture_set("marble", tmp_path)
    with pytest.raises(TexadError, match="image_size"):
        ensure_texture_set("brick", tmp_path, image_size=16)


# --- ELPV ---------------------------------------------------------------------------------------


def elpv_labels_by_name():
    return {path.name: (prob, kind) for path, prob, kind in embedded.elpv_labels()}


@pytest.mark.slow
@pytest.mark.parametrize("cell_type", ["mono", "poly", "all"])
def test_elpv_layout_labels_and_cell_type(tmp_path, cell_type):
    import elpv_dataset  # noqa: F401  (a hard dependency, pyproject.toml: a broken install fails here, never skips)
    folder = ensure_elpv_set(tmp_path, cell_type=cell_type, limit=10, image_size=64)
    assert folder.name == ("elpv" if cell_type == "all" else f"elpv_{cell_type}")
    assert {p.name for p in folder.iterdir()} == {"train", "test", MARKER}
    assert sorted(p.name for p in (folder / "test").iterdir()) == ["defective", "good"]
    labels = elpv_labels_by_name()
    train = sorted(p.name for p in (folder / "train" / "good").glob("*.png"))
    good = sorted(p.name for p in (folder / "test" / "good").glob("*.png"))
    bad = sorted(p.name for p in (folder / "test" / "defective").glob("*.png"))
    assert (len(train), len(good), len(bad)) == (7, 3, 10)
    assert not set(train) & set(good)
    assert all(labels[n][0] == 0.0 for n in train + good)
    assert all(labels[n][0] == 1.0 for n in bad)
    if cell_type != "all":
        assert all(labels[n][1] == cell_type for n in train + good + bad)
    image = cv2.imread(str(folder / "test" / "defective" / bad[0]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (64, 64) and image.dtype == np.uint8


@pytest.mark.slow
def test_elpv_is_deterministic_and_copies_originals(tmp_path, monkeypatch):
    import elpv_dataset  # noqa: F401  (a hard dependency, pyproject.toml: a broken install fails here, never skips)
    a = ensure_elpv_set(tmp_path / "a", cell_type="poly", limit=6, seed=3)
    b = ensure_elpv_set(tmp_path / "b", cell_type="poly", limit=6, seed=3)
    assert files_of(a) == files_of(b)
    originals = {path.name: path for path, _, _ in embedded.elpv_labels()}
    some = next((a / "train" / "good").glob("*.png"))
    assert some.read_bytes() == originals[some.name].read_bytes()
    monkeypatch.setattr(embedded, "_build_elpv_set", lambda *args: pytest.fail("rebuilt a complete set"))
    assert ensure_elpv_set(tmp_path / "a", cell_type="poly", limit=6, seed=3) == a


def test_elpv_full_label_counts():
    import elpv_dataset  # noqa: F401  (a hard dependency, pyproject.toml: a broken install fails here, never skips)
    rows = embedded.elpv_labels()
    assert len(rows) == 2624
    assert sum(p == 0.0 for _, p, _ in rows) == 1508 and sum(p == 1.0 for _, p, _ in rows) == 715


@pytest.mark.slow
def test_elpv_rejects_bad_arguments(tmp_path):
    with pytest.raises(TexadError, match="mono, poly, all"):
        ensure_elpv_set(tmp_path, cell_type="thin-film")
    with pytest.raises(TexadError, match="test_fraction_normal"):
        ensure_elpv_set(tmp_path, test_fraction_normal=1.0)
