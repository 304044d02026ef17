"""`python -m texad.tools.split_shift`: how far the embedded sets' test crops are from their training crops.

An embedded set's splits are cut from disjoint parts of one photo (`texad.data.embedded.LAYOUTS`). The
photos are taken at an angle, so parts of a photo differ in scale and contrast, and a split by parts can
put that difference between training and test: a shift every method then pays. This measures it per
photo and layout. Crops are drawn with the generator's own sampler (`embedded.crop_corner`, seeded per
folder and index exactly as the set's images are), at the photo's scale (128 source px, unflipped:
every statistic below is invariant to flips), and described by

- `sigma`: the scale-normalised Laplacian's peak, argmax over σ of mean (σ² ∇²G_σ * I)², in px (a blob
  of radius r peaks at σ = r/√2; log-σ parabola through the best grid point);
- `period`: the texture's period from the spectrum, 1 / (power-weighted mean radial frequency) of the
  Hann-windowed crop without its mean, over frequencies 1/64..1/2 cycles/px (brick size, stone size);
- `contrast`: the grey levels' standard deviation;
- `mean`: the mean grey level (brightness, reported next to scale and contrast).

Per statistic, the two-sample Kolmogorov–Smirnov distance D = sup |F_train − F_test| between the
training and test crops (`ks_distance`, equal to scipy.stats.ks_2samp's statistic); the worst over the
scale and contrast statistics is what the issue-28 goal (≤ 0.55) is about. `--picture` draws every
layout's rectangles on each photo.

    python -m texad.tools.split_shift                                  # v2 and v3, 200 crops per split
    python -m texad.tools.split_shift --layouts 3 --stride 1                # every crop position: exact
    python -m texad.tools.split_shift --picture docs/split_regions.png
"""

from __future__ import annotations

import argparse
from typing import Sequence

import cv2
import numpy as np
from scipy import ndimage

from texad.data import embedded
from texad.errors import TexadError
from texad.outputs import atomic_write

STATISTICS = ("sigma", "period", "contrast", "mean")
SHIFT_STATISTICS = ("sigma", "period", "contrast")  # scale and contrast: the goal's worst is over these
SIGMAS = np.geomspace(0.7, 16.0, 33)
COLOURS = {"train/good": (200, 90, 20), "val/good": (40, 170, 40), "test": (30, 30, 220)}  # BGR


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic sup_x |F_a(x) − F_b(x)| of two samples (empirical CDFs)."""
    a, b = np.sort(np.asarray(a, float).ravel()), np.sort(np.asarray(b, float).ravel())
    if not len(a) or not len(b):
        raise TexadError("ks_distance needs two non-empty samples")
    points = np.concatenate([a, b])
    fa = np.searchsorted(a, points, side="right") / len(a)
    fb = np.searchsorted(b, points, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def laplacian_peak_sigma(crop: np.ndarray) -> float:
    """The σ (px) at which the scale-normalised Laplacian's energy mean (σ² ∇²G_σ * crop)² peaks."""
    crop = np.asarray(crop, np.float64)
    energy = np.array([np.mean((s * s * ndimage.gaussian_laplace(crop, s, mode="reflect")) ** 2) for s in SIGMAS])
    k = int(np.argmax(energy))
    if 0 < k < len(SIGMAS) - 1:  # parabola in log σ through the peak and its neighbours
        y0, y1, y2 = np.log(energy[k - 1 : k + 2])
        denominator = y0 - 2 * y1 + y2
        step = np.log(SIGMAS[1] / SIGMAS[0])
        offset = 0.5 * (y0 - y2) / denominator if denominator < 0 else 0.0
        return float(SIGMAS[k] * np.exp(np.clip(offset, -0.5, 0.5) * step))
    return float(SIGMAS[k])


def spectral_period(crop: np.ndarray) -> float:
    """1 / (power-weighted mean radial frequency) of the windowed crop, over 1/64..1/2 cycles/px, in px."""
    crop = np.asarray(crop, np.float64)
    h, w = crop.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2((crop - crop.mean()) * window)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    radius = np.hypot(fy, fx)
    band = (radius >= 1 / 64) & (radius <= 0.5)
    return float(1.0 / (np.sum(power[band] * radius[band]) / np.sum(power[band])))


def crop_statistics(crop: np.ndarray) -> dict[str, float]:
    crop = np.asarray(crop, np.float64)
    return {"sigma": laplacian_peak_sigma(crop), "period": spectral_period(crop), "contrast": float(crop.std()),
            "mean": float(crop.mean())}


def split_crops(photo: np.ndarray, name: str, folder: str, layout: int, n: int, seed: int = 0) -> list[np.ndarray]:
    """The first `n` crops of `folder` the set's generator would draw (its corners, unflipped, at photo scale)."""
    boxes = embedded.region_of(folder, layout)
    crops = []
    for index in range(n):
        y, x = embedded.crop_corner(boxes, embedded._image_rng(seed, name, folder, index))
        crops.append(photo[y : y + embedded.CROP_SIDE, x : x + embedded.CROP_SIDE])
    return crops


def grid_crops(photo: np.ndarray, folder: str, layout: int, stride: int) -> list[np.ndarray]:
    """Every crop whose corner lies on a `stride` grid of each of the folder's rectangles (1: every position)."""
    side = embedded.CROP_SIDE
    return [photo[y : y + side, x : x + side] for top, bottom, left, right in embedded.region_of(folder, layout)
            for y in range(top, bottom - side + 1, stride) for x in range(left, right - side + 1, stride)]


def measure(name: str, layout: int, n: int, seed: int = 0, stride: int | None = None) -> dict[str, float]:
    """KS distance train vs test crops per statistic, and `worst` over `SHIFT_STATISTICS`.

    Crops: the generator's first `n` draws per split, or with `stride` every crop on that grid of corners
    (stride 1 is the exact distribution the generator draws from: its corners are uniform over positions).
    """
    photo = embedded.load_texture(name)
    stats = {}
    for folder in ("train/good", "test/good"):
        crops = (split_crops(photo, name, folder, layout, n, seed) if stride is None
                 else grid_crops(photo, folder, layout, stride))
        values = [crop_statistics(c) for c in crops]
        stats[folder] = {k: np.array([v[k] for v in values]) for k in STATISTICS}
    ks = {k: ks_distance(stats["train/good"][k], stats["test/good"][k]) for k in STATISTICS}
    ks["worst"] = max(ks[k] for k in SHIFT_STATISTICS)
    for k in STATISTICS:
        ks[f"train_{k}"] = float(np.median(stats["train/good"][k]))
        ks[f"test_{k}"] = float(np.median(stats["test/good"][k]))
    return ks


def region_picture(layouts: Sequence[int], side: int = 256) -> np.ndarray:
    """BGR image: one row per layout, one column per photo, each split's rectangles tinted and outlined."""
    scale = side / embedded.SOURCE_SIDE
    head, label = 24, 22
    sheet = np.full((len(layouts) * (side + head) + label, len(embedded.TEXTURES) * (side + 8), 3), 255, np.uint8)
    for c, name in enumerate(embedded.TEXTURES):
        x0 = c * (side + 8)
        cv2.putText(sheet, name, (x0 + 4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        photo = cv2.cvtColor(cv2.resize(embedded.load_texture(name), (side, side), interpolation=cv2.INTER_AREA),
                             cv2.COLOR_GRAY2BGR)
        for r, layout in enumerate(layouts):
            tile = photo.copy()
            tint = tile.copy()
            for folder, colour in COLOURS.items():
                for top, bottom, left, right in embedded.LAYOUTS[layout][folder]:
                    p0 = (round(left * scale), round(top * scale))
                    p1 = (round(right * scale) - 1, round(bottom * scale) - 1)
                    cv2.rectangle(tint, p0, p1, colour, -1)
                    cv2.rectangle(tile, p0, p1, colour, 2)
            tile = cv2.addWeighted(tile, 0.65, tint, 0.35, 0)
            y0 = label + r * (side + head)
            cv2.putText(sheet, f"v{layout}", (x0 + side - 30, y0 + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                        cv2.LINE_AA)
            sheet[y0 + head : y0 + head + side, x0 : x0 + side] = tile
    return _with_legend(sheet, "blue: train   green: validation   red: test")


def _with_legend(sheet: np.ndarray, legend: str) -> np.ndarray:
    bar = np.full((22, sheet.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, legend, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([sheet, bar])


def split_counts(layout: int) -> dict[str, tuple[int, float, int]]:
    """Per split: (crop positions, area in 128² crops, most non-overlapping 128² crops that fit)."""
    out = {}
    side = embedded.CROP_SIDE
    for folder, boxes in embedded.LAYOUTS[layout].items():
        positions = sum(embedded.crop_positions(boxes))
        area = sum((b - t) * (r - l) for t, b, l, r in boxes) / side**2
        packed = sum(((b - t) // side) * ((r - l) // side) for t, b, l, r in boxes)
        out[folder] = (positions, area, packed)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m texad.tools.split_shift", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", type=int, default=sorted(embedded.LAYOUTS))
    parser.add_argument("--textures", nargs="+", default=list(embedded.TEXTURES))
    parser.add_argument("--crops", type=int, default=200, help="crops drawn per split (the generator's first n)")
    parser.add_argument("--seed", type=int, default=0, help="the sets' generation_seed")
    parser.add_argument("--stride", type=int, default=None,
                        help="instead of --crops draws: every crop position on this grid (1 = all of them)")
    parser.add_argument("--picture", default=None, help="write the layouts' rectangles on each photo to this PNG")
    args = parser.parse_args(argv)
    if [t for t in args.textures if t not in embedded.TEXTURES]:
        raise TexadError(f"--textures must come from {', '.join(embedded.TEXTURES)}, got {args.textures}")
    unknown = [v for v in args.layouts if v not in embedded.LAYOUTS]
    if unknown:
        raise TexadError(f"unknown layouts {unknown}; known: {sorted(embedded.LAYOUTS)}")
    if args.crops < 2 or (args.stride is not None and args.stride < 1):
        raise TexadError(f"--crops must be at least 2 and --stride at least 1, got {args.crops}, {args.stride}")

    source = f"{args.crops} draws per split" if args.stride is None else f"every crop position, stride {args.stride}"
    print(f"KS distance, training vs test crops ({source}; worst over {', '.join(SHIFT_STATISTICS)})")
    print("| photo | layout | " + " | ".join(STATISTICS) + " | worst | medians train → test (sigma, period, contrast) |")
    print("|---|---|" + "---|" * (len(STATISTICS) + 2))
    for name in args.textures:
        for layout in args.layouts:
            ks = measure(name, layout, args.crops, args.seed, args.stride)
            medians = ", ".join(f"{ks[f'train_{k}']:.2f} → {ks[f'test_{k}']:.2f}" for k in SHIFT_STATISTICS)
            cells = " | ".join(f"{ks[k]:.2f}" for k in STATISTICS)
            print(f"| {name} | v{layout} | {cells} | **{ks['worst']:.2f}** | {medians} |", flush=True)
    print("\n| layout | split | 128² crop positions | area in 128² crops | non-overlapping 128² crops |")
    print("|---|---|---|---|---|")
    for layout in args.layouts:
        for folder, (positions, area, packed) in split_counts(layout).items():
            print(f"| v{layout} | {folder} | {positions} | {area:.2f} | {packed} |")
    if args.picture:
        ok, encoded = cv2.imencode(".png", region_picture(args.layouts))
        if not ok:
            raise TexadError("could not encode the regions picture")
        atomic_write(args.picture, lambda tmp: tmp.write_bytes(encoded.tobytes()))
        print(f"\nregions: {args.picture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
