"""texad.tools.split_shift: the KS distance, the scale statistics, the layouts' crop counts and picture."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from texad.data import embedded
from texad.errors import TexadError
from texad.tools import split_shift


@pytest.mark.parametrize("n, m, ties", [(5, 7, False), (40, 64, False), (30, 30, True), (1, 9, True)])
def test_ks_distance_matches_scipy(n, m, ties):
    rng = np.random.default_rng(n * 100 + m)
    for _ in range(20):
        a, b = rng.normal(0, 1, n), rng.normal(0.3, 1.2, m)
        if ties:
            a, b = np.round(a), np.round(b)
        assert split_shift.ks_distance(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)
    assert split_shift.ks_distance([1, 2, 3], [4, 5]) == 1.0
    assert split_shift.ks_distance([1, 2, 3], [3, 2, 1]) == 0.0
    with pytest.raises(TexadError, match="non-empty"):
        split_shift.ks_distance([], [1.0])


def test_spectral_period_of_a_grating():
    yy, xx = np.mgrid[0:128, 0:128]
    for period in (8.0, 16.0):
        grating = 100 + 40 * np.sin(2 * np.pi * xx / period)
        assert split_shift.spectral_period(grating) == pytest.approx(period, rel=0.08)


def test_laplacian_peak_grows_with_blob_size():
    yy, xx = np.mgrid[0:128, 0:128]
    found = []
    for radius in (3.0, 6.0):
        image = np.zeros((128, 128))
        for cy in range(16, 128, 32):  # a lattice of discs, 32 px apart
            for cx in range(16, 128, 32):
                image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 100.0
        found.append(split_shift.laplacian_peak_sigma(image))
    # energy of σ²∇²G on a disc of radius r peaks near r/√2 (one grid step of tolerance either way)
    assert found[0] == pytest.approx(3 / np.sqrt(2), rel=0.25) and found[1] == pytest.approx(6 / np.sqrt(2), rel=0.25)


def test_split_counts_of_version_3():
    counts = split_shift.split_counts(3)
    assert counts["train/good"] == (4 * 49, 4 * 128 * 176 / 128**2, 4)
    assert counts["test"] == (4 * 49, 4 * 128 * 176 / 128**2, 4)
    assert counts["val/good"] == (385, 4.0, 4)


def test_split_crops_are_the_generators_crops():
    photo = embedded.load_texture("gravel")
    crops = split_shift.split_crops(photo, "gravel", "test/good", 3, 3)
    for index, crop in enumerate(crops):  # the set's own crop (before its flips) is one of crop's flips
        rng = embedded._image_rng(0, "gravel", "test/good", index)
        made = embedded._random_crop(photo, embedded.region_of("test/good"), embedded.CROP_SIDE, rng)
        assert any(np.array_equal(made, f) for f in (crop, crop[::-1], crop[:, ::-1], crop[::-1, ::-1]))


def test_main_prints_tables_and_writes_the_picture(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(split_shift, "SIGMAS", np.geomspace(1.0, 8.0, 7))  # fast
    picture = tmp_path / "regions.png"
    assert split_shift.main(["--textures", "gravel", "--crops", "4", "--layouts", "3", "--picture", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "| gravel | v3 |" in out and "| v3 | test | 196 |" in out
    import cv2

    image = cv2.imread(str(picture))
    assert image is not None and image.shape[0] > 256 and image.shape[1] > 3 * 256
    with pytest.raises(TexadError, match="unknown layouts"):
        split_shift.main(["--layouts", "7"])


def test_grid_crops_at_stride_one_are_every_position():
    photo = embedded.load_texture("brick")
    crops = split_shift.grid_crops(photo, "test/good", 3, 1)
    assert len(crops) == sum(embedded.crop_positions(embedded.REGIONS["test"])) == 196
    assert len(split_shift.grid_crops(photo, "test/good", 3, 8)) == 4 * 7


def test_main_rejects_unknown_photos():
    with pytest.raises(TexadError, match="brick, grass, gravel"):
        split_shift.main(["--textures", "marble"])
