"""`python -m texad.tools.contact_sheet`: every test normal of an embedded texture set on one PNG.

So a reader can see what "normal" is before reading a false positive: the photo's own structures
(gravel's dark gaps, grass's bright blades, brick's mortar irregularities) are labelled normal, and a
method that flags them is wrong. Each tile is one image of `test/good/`, with its file name.

    python -m texad.tools.contact_sheet                       # all three sets, into outputs/contact_sheets/
    python -m texad.tools.contact_sheet --sets textures/gravel --out sheets --columns 8
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


def contact_sheet(folder: Path, columns: int = 8, tile: int = 160, title: str = "") -> np.ndarray:
    """uint8 BGR image: the images of `folder` in a grid of `columns`, each `tile` px with its name below."""
    paths = list_images(folder)
    if not paths:
        raise TexadError(f"no images in {str(folder)!r}")
    rows = math.ceil(len(paths) / columns)
    label, head = 18, 30 if title else 0
    sheet = np.full((head + rows * (tile + label), columns * tile, 3), 255, np.uint8)
    if title:
        cv2.putText(sheet, title, (6, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    for i, path in enumerate(paths):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise TexadError(f"cannot read {str(path)!r}")
        r, c = divmod(i, columns)
        y, x = head + r * (tile + label), c * tile
        sheet[y:y + tile, x:x + tile] = _fit(image, tile)
        cv2.putText(sheet, path.stem, (x + 4, y + tile + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return sheet


def _fit(image: np.ndarray, tile: int) -> np.ndarray:
    """The image resized into a tile with a 1 px white frame."""
    out = np.full((tile, tile, 3), 255, np.uint8)
    out[1:-1, 1:-1] = cv2.resize(image, (tile - 2, tile - 2), interpolation=cv2.INTER_AREA)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m texad.tools.contact_sheet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), help="embedded texture sets (default: all three)")
    parser.add_argument("--out", default="outputs/contact_sheets", help="folder for <set>.png")
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--override", action="append", default=[],
                        help="dataset override as train.py takes it, e.g. dataset.generated_size=128")
    args = parser.parse_args(argv)


    out = Path(args.out)
    for name in args.sets:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"dataset={name}", "paths.output_dir=.", *args.override])
        datamodule = instantiate(cfg.dataset, _convert_="all")
        datamodule.setup()
        folder = Path(datamodule.split.test[0].path).parents[1] / GOOD
        sheet = contact_sheet(folder, args.columns, title=f"{name}: test/{GOOD} ({len(list_images(folder))} images)")
        target = out / f"{name.replace('/', '_')}.png"
        ok, encoded = cv2.imencode(".png", sheet)
        if not ok:
            raise TexadError(f"could not encode the contact sheet of {name}")
        atomic_write(target, lambda tmp: tmp.write_bytes(encoded.tobytes()))
        print(f"{name}: {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
