"""`python -m texad.tools.contact_sheet`: every test normal of an embedded texture set on one PNG.

So a reader can see what "normal" is before reading a false positive: the photo's own structures
(gravel's dark gaps, grass's bright blades, brick's mortar irregularities) are labelled normal, and a
method that flags them is wrong. Each tile is one image of `test/good/`, with its file name.
`--defects` adds one sheet per defect type, at 1× by default (a tile per image pixel for pixel, so what is
invisible on the sheet is invisible in the image): each image twice, as it is and with its mask's
outline in red, so a defect can be judged without the outline hiding it.

    python -m texad.tools.contact_sheet                       # all three sets, into outputs/contact_sheets/
    python -m texad.tools.contact_sheet --sets textures/gravel --out sheets --columns 8
    python -m texad.tools.contact_sheet --defects --sets textures/gravel   # + textures_gravel_<type>.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from texad.data.layout import GOOD, list_images
from texad.errors import TexadError
from texad.outputs import atomic_write
from texad.tools import CONF_DIR

SETS = ("textures/brick", "textures/grass", "textures/gravel")


def contact_sheet(
    folder: Path, columns: int = 8, tile: int = 160, title: str = "", masks: Path | None = None
) -> np.ndarray:
    """uint8 BGR image: the images of `folder` in a grid of `columns`, each `tile` px with its name below.

    With `masks` (a ground_truth/<type> folder holding `<stem>_mask.png`), each image fills two tiles:
    as it is, then with the outline of its mask in red.
    """
    paths = list_images(folder)
    if not paths:
        raise TexadError(f"no images in {str(folder)!r}")
    tiles: list[tuple[np.ndarray, str]] = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise TexadError(f"cannot read {str(path)!r}")
        if masks is None:
            tiles.append((_fit(image, tile), path.stem))
            continue
        mask_path = masks / f"{path.stem}_mask.png"
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if mask is None or mask.shape != image.shape[:2]:
            raise TexadError(f"no mask of {image.shape[:2]} px at {str(mask_path)!r} for {str(path)!r}")
        tiles += [(_fit(image, tile), path.stem), (_fit(outlined(image, mask > 0), tile), f"{path.stem} mask")]
    rows = math.ceil(len(tiles) / columns)
    label, head = 18, 30 if title else 0
    sheet = np.full((head + rows * (tile + label), columns * tile, 3), 255, np.uint8)
    if title:
        cv2.putText(sheet, title, (6, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (image, name) in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = head + r * (tile + label), c * tile
        sheet[y:y + tile, x:x + tile] = image
        cv2.putText(sheet, name, (x + 4, y + tile + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return sheet


def outlined(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A BGR copy of `image` with the outline of the bool `mask` drawn in red, 1 px."""
    out = image.copy()
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (0, 0, 255), 1)
    return out


def _fit(image: np.ndarray, tile: int) -> np.ndarray:
    """The image resized into a tile with a 1 px white frame (pixel for pixel when it is tile − 2 px)."""
    out = np.full((tile, tile, 3), 255, np.uint8)
    inner = tile - 2
    if image.shape[:2] != (inner, inner):
        interpolation = cv2.INTER_AREA if max(image.shape[:2]) > inner else cv2.INTER_NEAREST
        image = cv2.resize(image, (inner, inner), interpolation=interpolation)
    out[1:-1, 1:-1] = image
    return out


def _write(target: Path, sheet: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", sheet)
    if not ok:
        raise TexadError(f"could not encode the contact sheet {str(target)!r}")
    atomic_write(target, lambda tmp: tmp.write_bytes(encoded.tobytes()))
    print(target)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m texad.tools.contact_sheet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), help="embedded texture sets (default: all three)")
    parser.add_argument("--out", default="outputs/contact_sheets", help="folder for <set>.png")
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--override", action="append", default=[],
                        help="dataset override as train.py takes it, e.g. dataset.generated_size=128")
    parser.add_argument("--defects", action="store_true",
                        help="also one sheet per defect type, each image plain and with its mask's outline")
    parser.add_argument("--tile", type=int, default=None,
                        help="tile side in px (default 160 for normals; for --defects the image side + 2, i.e. 1×)")
    args = parser.parse_args(argv)
    if args.columns < 1 or (args.tile is not None and args.tile < 16):
        raise TexadError(f"--columns must be ≥ 1 and --tile ≥ 16, got {args.columns}, {args.tile}")

    out = Path(args.out)
    for name in args.sets:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"dataset={name}", "paths.output_dir=.", *args.override])
        datamodule = instantiate(cfg.dataset, _convert_="all")
        datamodule.setup()
        root = Path(datamodule.split.test[0].path).parents[1]
        stem = name.replace("/", "_")
        folder = root / GOOD
        title = f"{name}: test/{GOOD} ({len(list_images(folder))} images)"
        _write(out / f"{stem}.png", contact_sheet(folder, args.columns, args.tile or 160, title=title))
        if not args.defects:
            continue
        for defect_type in sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != GOOD):
            folder, masks = root / defect_type, root.parent / "ground_truth" / defect_type
            side = cv2.imread(str(list_images(folder)[0]), cv2.IMREAD_GRAYSCALE).shape[0]
            title = f"{name}: test/{defect_type}, each image plain and with its mask outlined (red)"
            sheet = contact_sheet(folder, args.columns, args.tile or side + 2, title=title, masks=masks)
            _write(out / f"{stem}_{defect_type}.png", sheet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
