"""`python -m texad.tools.defect_visibility`: how far each planted test defect stands out from its surround.

A defect a person cannot see at 1× measures nothing: a method that misses it is not wrong. Per image,

    visibility = mean over the mask of |image − clean| / std of the clean image in a ring around the mask

where `clean` is the very crop the defect was planted into (`texad.data.embedded.make_image`), and the
ring is the mask dilated by `ring` px (a disc; default side/32, 8 px at 256²) minus the mask: the local
texture contrast the defect has to beat. 1 means the defect changes its pixels, on average, by one local
standard deviation of the texture. The statistic sees contrast only, not shape: a dark blob on gravel
can score high and still look like the dark gap between two stones, so read it next to the contact
sheets (`python -m texad.tools.contact_sheet --defects`).

    python -m texad.tools.defect_visibility                       # 3 photos × 5 types, 16 images each, 256²
    python -m texad.tools.defect_visibility --textures gravel --n 32
"""

from __future__ import annotations

import argparse
from typing import Sequence

import cv2
import numpy as np

from texad.data import embedded
from texad.data.synthetic import DEFECT_TYPES
from texad.errors import TexadError


def ring_of(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` px (Euclidean) of the mask, outside it."""
    if width < 1:
        raise TexadError(f"ring width must be at least 1 px, got {width}")
    yy, xx = np.mgrid[-width : width + 1, -width : width + 1]
    disc = (yy * yy + xx * xx <= width * width).astype(np.uint8)
    grown = cv2.dilate(mask.astype(np.uint8), disc) > 0
    return grown & ~mask


def visibility(clean: np.ndarray, image: np.ndarray, mask: np.ndarray, width: int) -> float:
    """mean |image − clean| inside `mask` / std of `clean` in the ring of `width` px around it."""
    mask = np.asarray(mask, bool)
    if clean.shape != image.shape or clean.shape[:2] != mask.shape or not mask.any():
        raise TexadError(f"visibility needs a non-empty mask of the images' shape, got {clean.shape}, "
                         f"{image.shape}, {mask.shape} with {int(mask.sum())} pixels")
    delta = np.abs(image.astype(np.float64) - clean.astype(np.float64))
    ring = ring_of(mask, width)
    std = float(clean.astype(np.float64)[ring].std()) if ring.any() else 0.0
    return float(delta[mask].mean() / max(std, 1.0))  # 1 grey level floor: a flat surround is not infinitely easy


def measure(name: str, defect_type: str, n: int, size: int, seed: int = 0, ring: int | None = None) -> np.ndarray:
    """The visibility of the first `n` images of test/<defect_type> of the set `name` at `size`²."""
    source = embedded.load_texture(name)
    width = ring if ring is not None else max(2, round(size / 32))
    values = []
    for index in range(n):
        clean, image, mask = embedded.make_image(source, name, f"test/{defect_type}", index, size, seed)
        values.append(visibility(clean, image, mask, width))
    return np.array(values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m texad.tools.defect_visibility",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--textures", nargs="+", default=list(embedded.TEXTURES))
    parser.add_argument("--types", nargs="+", default=list(DEFECT_TYPES))
    parser.add_argument("--n", type=int, default=16, help="images per type (the set's first n; 16 by default)")
    parser.add_argument("--size", type=int, default=256, help="the set's generated_size")
    parser.add_argument("--seed", type=int, default=0, help="the set's generation_seed")
    parser.add_argument("--ring", type=int, default=None, help="ring width in px (default size/32)")
    args = parser.parse_args(argv)
    if [t for t in args.textures if t not in embedded.TEXTURES]:
        raise TexadError(f"--textures must come from {', '.join(embedded.TEXTURES)}, got {args.textures}")
    unknown = [t for t in args.types if t not in DEFECT_TYPES]
    if unknown or args.n < 1:
        raise TexadError(f"--types must come from {', '.join(DEFECT_TYPES)} (got {unknown}) and --n ≥ 1")

    print(f"visibility = mean |Δ| in the mask / std of the clean texture in a ring around it "
          f"({args.n} images per type, {args.size}²): median [min–max], share of images under 1")
    print("| photo | " + " | ".join(args.types) + " |")
    print("|---|" + "---|" * len(args.types))
    for name in args.textures:
        cells = []
        for t in args.types:
            v = measure(name, t, args.n, args.size, args.seed, args.ring)
            cells.append(f"{np.median(v):.2f} [{v.min():.2f}–{v.max():.2f}] {np.mean(v < 1):.0%}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
