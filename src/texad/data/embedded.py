"""Data sets that ship with texad: no download, written once into a cache folder in MVTec AD layout.

- Texture sets ("brick", "grass", "gravel"): crops of scikit-image's 512×512 sample photos with
  synthetic defects (`texad.data.synthetic`) and exact masks. Version 3 (issue 28) cuts training,
  validation and test crops from disjoint rectangles of each photo (`REGIONS`) laid out so that every
  split spans every row of the photo: the photos are taken at an angle (brick's courses grow coarser
  down the photo and across it, grass's contrast rises down it), and version 2's horizontal bands
  (`LAYOUTS[2]`: train rows 0–183, test rows 344–511) put that shift between training and test. Columns
  L = 0–175, C = 192–319, R = 336–511 and four row blocks of 128 px (R0..R3):

  | split | rectangles | crop positions (128² crops) | 128² crops of area, × 4 flips |
  |---|---|---|---|
  | train/good | L×R0, R×R1, L×R2, L×R3 | 4 × 1 × 49 | 5.5 (4 without overlap) |
  | val/good | C × all rows | 385 × 1 | 4 |
  | test (good and defective) | R×R0, L×R1, R×R2, R×R3 | 4 × 1 × 49 | 5.5 (4 without overlap) |

  No test image shares a pixel with a training or validation image (columns are 16 px apart; row blocks
  of one column touch, so a test crop and a training crop may be neighbours). `python -m
  texad.tools.split_shift` measures the shift (KS distance of scale and contrast statistics of training
  vs test crops, docs/validation.md). How much a split can vary: it holds the area of 4–6
  non-overlapping crops, and each crop is also flipped left-right and up-down at random (no rotation:
  brick's courses and grass's blades have a direction); images of one split overlap in content, so 64
  test normals are not 64 independent views of the surface (the bootstrap intervals of
  `texad.metrics.bootstrap` treat them as independent draws, so they are too narrow). Crops are 128
  source pixels, resized to `image_size` (256 by default: the texture at twice the photo's scale; 128
  keeps it 1:1). Each image has its own generator seeded by (seed, texture, folder, index), so a set is
  reproducible byte for byte and raising one count leaves the other images unchanged.
- ELPV: the electroluminescence solar-cell images of the `elpv-dataset` package, image labels only.

Each set is built in a temporary folder next to its target, marked complete with a JSON file holding
its parameters, then renamed into place, so an interrupted build never leaves a set that looks done.
A call with the same parameters returns at once; other parameters rebuild and replace the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from importlib.resources import files
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from tqdm import tqdm

from texad.data.synthetic import DEFECT_TYPES, MIN_IMAGE_SIDE, plant_defect
from texad.errors import TexadError

TEXTURES = ("brick", "grass", "gravel")
CELL_TYPES = ("mono", "poly", "all")
MARKER = ".texad_complete.json"
GENERATOR_VERSION = 3  # of the texture sets: bump when their content changes, so old caches are rebuilt
ELPV_VERSION = 2  # ELPV's own (its content has not changed since version 2, so its caches stay valid)
CROP_SIDE = 128  # source pixels per crop, resized to image_size
SOURCE_SIDE = 512  # the sample photos' side
Box = tuple[int, int, int, int]  # photo rows [top, bottom) and columns [left, right)
_L, _C, _R = (0, 176), (192, 320), (336, 512)  # version 3's column blocks
_ROWS = tuple((top, top + 128) for top in range(0, 512, 128))  # version 3's row blocks
#: version 3: the column block training takes in each row block (test takes the other one). Of the 16
#: assignments, the one with the smallest worst KS distance over the three photos (split_shift, every crop
#: position: 0.32 / 0.50 / 0.32; the alternating L, R, L, R gives 0.36 / 0.55 / 0.61, failing on gravel)
_TRAIN_SIDES = ("L", "R", "L", "L")
#: each version's rectangles per split (disjoint between splits); version 2 is kept for split_shift's comparison
LAYOUTS: dict[int, dict[str, tuple[Box, ...]]] = {
    2: {"train/good": ((0, 184, 0, 512),), "val/good": ((200, 328, 0, 512),), "test": ((344, 512, 0, 512),)},
    3: {
        "train/good": tuple((*rows, *(_R if side == "R" else _L)) for rows, side in zip(_ROWS, _TRAIN_SIDES)),
        "val/good": ((0, 512, *_C),),
        "test": tuple((*rows, *(_L if side == "R" else _R)) for rows, side in zip(_ROWS, _TRAIN_SIDES)),
    },
}
REGIONS = LAYOUTS[GENERATOR_VERSION]
ELPV_DEFECT_TYPE = "defective"


def ensure_texture_set(
    name: str,
    root: str | Path,
    image_size: int = 256,
    n_train: int = 40,
    n_val_good: int = 10,
    n_test_good: int = 64,
    n_per_type: int = 16,
    defect_types: tuple[str, ...] | None = None,
    seed: int = 0,
) -> Path:
    """`<root>/<name>` in MVTec AD layout (plus `val/good/`), built if missing or made with other parameters.

    Training, validation and test crops come from the photo's rectangles in `REGIONS` (module docstring);
    `n_val_good=0` writes no validation normals (the datamodule then holds training images out).
    """
    if name not in TEXTURES:
        raise TexadError(f"unknown embedded texture {name!r}; choose one of {', '.join(TEXTURES)}")
    if int(image_size) < MIN_IMAGE_SIDE:
        raise TexadError(f"image_size must be at least {MIN_IMAGE_SIDE}, got {image_size}")
    for key, value, least in (("n_train", n_train, 1), ("n_val_good", n_val_good, 0), ("n_test_good", n_test_good, 1),
                              ("n_per_type", n_per_type, 1)):
        if int(value) < least:
            raise TexadError(f"{key} must be at least {least}, got {value}")
    types = sorted(set(DEFECT_TYPES if defect_types is None else defect_types))
    unknown = [t for t in types if t not in DEFECT_TYPES]
    if unknown or not types:
        raise TexadError(f"unknown defect types {unknown}; choose from {', '.join(DEFECT_TYPES)}")
    params = {
        "kind": "texture",
        "name": name,
        "image_size": int(image_size),
        "n_train": int(n_train),
        "n_val_good": int(n_val_good),
        "n_test_good": int(n_test_good),
        "n_per_type": int(n_per_type),
        "defect_types": types,
        "seed": int(seed),
    }
    return _materialise(
        Path(root).expanduser() / name, params, lambda tmp: _build_texture_set(tmp, params), GENERATOR_VERSION
    )


def ensure_elpv_set(
    root: str | Path,
    cell_type: str = "all",
    test_fraction_normal: float = 0.3,
    seed: int = 0,
    image_size: int | None = None,
    limit: int | None = None,
) -> Path:
    """ELPV cells in MVTec AD layout (no ground_truth): `<root>/elpv` or `<root>/elpv_<cell_type>`.

    Normal = defect probability 0, split by a permutation seeded by `seed` (the data set's own
    `dataset.split_seed`, fixed by default, not the run seed: every run sees the same test set)
    into train/good and test/good;
    defective = probability 1, all in test/defective. Cells rated 1/3 or 2/3 are left out: the
    annotators were unsure about them, and either label would be noise. `image_size` None copies
    the 300x300 PNGs unchanged; `limit` keeps the first `limit` normal and defective cells (tests).
    """
    if cell_type not in CELL_TYPES:
        raise TexadError(f"unknown ELPV cell_type {cell_type!r}; choose one of {', '.join(CELL_TYPES)}")
    if not 0.0 < test_fraction_normal < 1.0:
        raise TexadError(f"test_fraction_normal must be in (0, 1), got {test_fraction_normal}")
    if image_size is not None and int(image_size) < MIN_IMAGE_SIDE:
        raise TexadError(f"image_size must be None or at least {MIN_IMAGE_SIDE}, got {image_size}")
    if limit is not None and int(limit) < 2:
        raise TexadError(f"limit must be None or at least 2, got {limit}")
    params = {
        "kind": "elpv",
        "cell_type": cell_type,
        "test_fraction_normal": float(test_fraction_normal),
        "seed": int(seed),
        "image_size": None if image_size is None else int(image_size),
        "limit": None if limit is None else int(limit),
    }
    name = "elpv" if cell_type == "all" else f"elpv_{cell_type}"
    return _materialise(Path(root).expanduser() / name, params, lambda tmp: _build_elpv_set(tmp, params), ELPV_VERSION)


# --- texture sets -------------------------------------------------------------------------------


def load_texture(name: str) -> np.ndarray:
    """The 512x512 grayscale uint8 source texture bundled with scikit-image."""
    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return image.astype(np.uint8)


def _image_rng(seed: int, *keys: str | int) -> np.random.Generator:
    words = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else k for k in keys]
    return np.random.default_rng(words)


def region_of(folder: str, layout: int = GENERATOR_VERSION) -> tuple[Box, ...]:
    """The photo rectangles a folder's crops come from (`LAYOUTS`; every test/<type> folder shares "test")."""
    return LAYOUTS[layout]["test" if folder.startswith("test/") else folder]


def crop_positions(boxes: tuple[Box, ...], side: int = CROP_SIDE) -> list[int]:
    """How many top-left corners of a `side` crop fit inside each box."""
    return [max(0, b - t - side + 1) * max(0, r - l - side + 1) for t, b, l, r in boxes]


def crop_corner(boxes: tuple[Box, ...], rng: np.random.Generator, side: int = CROP_SIDE) -> tuple[int, int]:
    """A uniformly random top-left corner (y, x) among every `side` crop that fits inside one of `boxes`."""
    counts = crop_positions(boxes, side)
    if sum(counts) == 0:
        raise TexadError(f"no {side} px crop fits inside the photo rectangles {boxes}")
    k = int(rng.integers(sum(counts)))
    for (top, _, left, right), count in zip(boxes, counts):
        if k < count:
            width = right - left - side + 1
            return top + k // width, left + k % width
        k -= count
    raise AssertionError("unreachable")


def _random_crop(source: np.ndarray, boxes: tuple[Box, ...], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A CROP_SIDE crop inside one of the photo rectangles `boxes`, at a random place, flipped at random, resized."""
    if any(source.shape[0] < b or source.shape[1] < r for _, b, _, r in boxes):
        raise TexadError(f"texture photo of {source.shape[:2]} px does not hold the rectangles {boxes}")
    y, x = crop_corner(boxes, rng)
    crop = source[y : y + CROP_SIDE, x : x + CROP_SIDE]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    interpolation = cv2.INTER_AREA if image_size <= CROP_SIDE else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(crop), (image_size, image_size), interpolation=interpolation)


def _build_texture_set(folder: Path, params: dict) -> None:
    name, size, seed = params["name"], params["image_size"], params["seed"]
    source = load_texture(name)
    jobs: list[tuple[str, int]] = [("train/good", i) for i in range(params["n_train"])]
    jobs += [("val/good", i) for i in range(params["n_val_good"])]
    jobs += [("test/good", i) for i in range(params["n_test_good"])]
    jobs += [(f"test/{t}", i) for t in params["defect_types"] for i in range(params["n_per_type"])]
    for sub in {sub for sub, _ in jobs}:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for t in params["defect_types"]:
        (folder / "ground_truth" / t).mkdir(parents=True, exist_ok=True)
    for sub, index in tqdm(jobs, desc=f"texad: generating {name}", unit="img"):
        clean, image, mask = make_image(source, name, sub, index, size, seed)
        stem = f"{index:03d}"
        _write_png(folder / sub / f"{stem}.png", image)
        if mask is not None:
            _write_png(folder / "ground_truth" / sub.split("/", 1)[1] / f"{stem}_mask.png", mask.astype(np.uint8) * 255)


def make_image(
    source: np.ndarray, name: str, folder: str, index: int, image_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Image `index` of `folder` (e.g. "test/hole") of a set: (the clean crop, the image, its mask or None).

    The one place an embedded image is made, so measurements (`texad.tools.defect_visibility`) see the
    very crop a defect was planted into.
    """
    rng = _image_rng(seed, name, folder, index)
    clean = _random_crop(source, region_of(folder), image_size, rng)
    if folder.endswith("/good"):
        return clean, clean, None
    image, mask = plant_defect(clean, folder.split("/", 1)[1], rng)
    return clean, image, mask


def _write_png(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise TexadError(f"could not write {str(path)!r} (disk full or no permission?)")


# --- ELPV ---------------------------------------------------------------------------------------


def elpv_labels() -> list[tuple[Path, float, str]]:
    """(image path, defect probability, cell type) for every cell in the installed `elpv-dataset`."""
    try:
        data_dir = Path(str(files("elpv_dataset") / "data"))
    except ModuleNotFoundError as exc:
        raise TexadError("the ELPV data set needs the package elpv-dataset: pip install elpv-dataset") from exc
    labels = data_dir / "labels.csv"
    if not labels.is_file():
        raise TexadError(f"elpv-dataset is installed but has no {str(labels)!r}; reinstall it")
    rows = []
    for line in labels.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            rows.append((data_dir / parts[0], float(parts[1]), parts[2]))
    return rows


def _build_elpv_set(folder: Path, params: dict) -> None:
    rows = [r for r in elpv_labels() if params["cell_type"] in ("all", r[2])]
    normal = [r[0] for r in rows if r[1] == 0.0]
    defective = [r[0] for r in rows if r[1] == 1.0]
    if params["limit"] is not None:
        normal, defective = normal[: params["limit"]], defective[: params["limit"]]
    order = np.random.default_rng(params["seed"]).permutation(len(normal))
    n_test = min(max(1, round(params["test_fraction_normal"] * len(normal))), len(normal) - 1)
    test_ids = set(order[:n_test].tolist())
    jobs = [(p, "test/good" if i in test_ids else "train/good") for i, p in enumerate(normal)]
    jobs += [(p, f"test/{ELPV_DEFECT_TYPE}") for p in defective]
    for sub in ("train/good", "test/good", f"test/{ELPV_DEFECT_TYPE}"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for src, sub in tqdm(jobs, desc="texad: preparing ELPV", unit="img"):
        dst = folder / sub / src.name
        if params["image_size"] is None:
            shutil.copyfile(src, dst)
            continue
        image = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise TexadError(f"cannot read ELPV image {str(src)!r}; reinstall elpv-dataset")
        size = params["image_size"]
        interpolation = cv2.INTER_AREA if size <= min(image.shape) else cv2.INTER_CUBIC
        _write_png(dst, cv2.resize(image, (size, size), interpolation=interpolation))


# --- build once, atomically ---------------------------------------------------------------------


def _marker_params(folder: Path, version: int) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("generator_version") != version:
        return None
    return marker.get("params")


def _materialise(target: Path, params: dict, build: Callable[[Path], None], version: int) -> Path:
    """Build `target` with `build(tmp_folder)` unless it is already complete with `params` and `version`."""
    if _marker_params(target, version) == params:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if _marker_params(target, version) == params:  # another process built it while we waited
            return target
        if target.exists() and not (target / MARKER).exists():
            raise TexadError(
                f"{str(target)!r} exists but was not generated by texad; remove it or choose another root"
            )
        for stale in target.parent.glob(f".{target.name}.partial-*"):  # left by a crashed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            build(tmp)
            marker = {"generator": __name__, "generator_version": version, "params": params}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-old-", dir=target.parent))
                os.replace(target, old / target.name)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Holds an OS file lock so parallel runs (e.g. DDP ranks) build a set once, not side by side."""
    try:
        import fcntl  # POSIX only: imported where it is used, so Windows imports this module
    except ImportError:  # Windows: no lock; a parallel build loses at os.replace and raises
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
