"""Listing samples of a data set on disk: the MVTec AD layout, KSDD2 and Magnetic Tile Defects.

Each reader returns a `SampleSplit`; nothing here decodes images, so listing is cheap and errors about
the folder structure come before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from texad.errors import TexadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"

MVTEC_LAYOUT_HELP = (
    "expected MVTec AD layout: <root>/<category>/train/good/*.png, <root>/<category>/test/<type>/*.png "
    "(type 'good' for normal images) and optionally "
    "<root>/<category>/ground_truth/<type>/<name>_mask.png and <root>/<category>/val/good/*.png"
)
KSDD2_LAYOUT_HELP = (
    "expected KSDD2 layout: <root>/train/<id>.png + <id>_GT.png and <root>/test/<id>.png + <id>_GT.png"
)
MTD_LAYOUT_HELP = "expected MTD layout: <root>/MT_<Type>/Imgs/<name>.jpg with <name>.png masks; MT_Free is normal"


@dataclass(frozen=True)
class Sample:
    """One image on disk: label 1 = anomalous; mask_path None when the set has no pixel labels."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None


@dataclass
class SampleSplit:
    """The normal training images and the labelled test images of one data set; `val` holds the data
    set's own validation normals where it ships them (else the datamodule holds some training images out)."""

    train: list[Sample]
    test: list[Sample]
    has_masks: bool
    val: list[Sample] = field(default_factory=list)

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.test if s.label == 1})


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_mvtec_layout(category_dir: str | Path) -> SampleSplit:
    """Samples of one category in MVTec AD layout; ground_truth/ is optional (image labels only), and
    val/good/ (validation normals, texad's extension) too."""
    root = Path(category_dir).expanduser()
    if not root.is_dir():
        raise TexadError(f"dataset root {str(root)!r} does not exist; {MVTEC_LAYOUT_HELP}")
    train_dir, test_dir, gt_dir = root / "train" / GOOD, root / "test", root / "ground_truth"
    if not train_dir.is_dir():
        raise TexadError(f"missing folder {str(train_dir)!r}; {MVTEC_LAYOUT_HELP}")
    train = [Sample(p, 0, GOOD) for p in list_images(train_dir)]
    if not train:
        raise TexadError(f"no training images in {str(train_dir)!r} (expected *.png/*.jpg normal images)")
    if not test_dir.is_dir():
        raise TexadError(f"missing folder {str(test_dir)!r}; {MVTEC_LAYOUT_HELP}")
    has_masks = gt_dir.is_dir()
    test: list[Sample] = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect_type = type_dir.name
        for img in list_images(type_dir):
            if defect_type == GOOD:
                test.append(Sample(img, 0, GOOD))
                continue
            mask = None
            if has_masks:
                mask = gt_dir / defect_type / f"{img.stem}_mask.png"
                if not mask.is_file():
                    raise TexadError(
                        f"defective test image {str(img)!r} has no mask {str(mask)!r} although "
                        f"{str(gt_dir)!r} exists (every defective image needs <name>_mask.png)"
                    )
            test.append(Sample(img, 1, defect_type, mask))
    if not test:
        raise TexadError(f"no test images under {str(test_dir)!r}; {MVTEC_LAYOUT_HELP}")
    # texad's extension of the layout: validation normals of their own (the embedded sets cut them from
    # another part of the photo than training and test)
    val_dir = root / "val" / GOOD
    val = [Sample(p, 0, GOOD) for p in list_images(val_dir)] if val_dir.is_dir() else []
    return SampleSplit(train=train, test=test, has_masks=has_masks, val=val)


def read_ksdd2(root: str | Path) -> SampleSplit:
    """KSDD2: train/ and test/ hold <id>.png with <id>_GT.png; a non-empty GT marks a defect.

    Only the normal images of train/ are used for training (the one-class protocol).
    """
    base = Path(root).expanduser()
    help_ = KSDD2_LAYOUT_HELP
    if not base.is_dir():
        raise TexadError(f"dataset root {str(base)!r} does not exist; {help_}")

    def read(split: str) -> list[Sample]:
        folder = base / split
        if not folder.is_dir():
            raise TexadError(f"missing folder {str(folder)!r}; {help_}")
        out = []
        for img in list_images(folder):
            if img.stem.endswith("_GT"):
                continue
            gt = img.with_name(f"{img.stem}_GT.png")
            if not gt.is_file():
                raise TexadError(f"KSDD2 image {str(img)!r} has no mask {str(gt)!r}")
            m = cv2.imread(str(gt), cv2.IMREAD_GRAYSCALE)
            if m is None:
                raise TexadError(f"cannot read mask {str(gt)!r} (corrupt or not an image)")
            label = int(m.max() > 0)
            out.append(Sample(img, label, "defect" if label else GOOD, gt))
        return out

    train = [s for s in read("train") if s.label == 0]
    if not train:
        raise TexadError(f"no normal training images in {str(base / 'train')!r}")
    return SampleSplit(train=train, test=read("test"), has_masks=True)


def read_mtd(root: str | Path, train_fraction: float = 0.8, seed: int = 0) -> SampleSplit:
    """Magnetic Tile Defects: MT_<Type>/Imgs/*.jpg with same-name .png masks; MT_Free is normal.

    The data set has no split: a permutation seeded by `seed` sends `train_fraction` of the normal
    images to training and the rest, with every defective image, to test. Callers pass the data
    set's own `dataset.split_seed` (fixed, 0 by default), never the run seed, so runs that differ
    only in `seed` are scored on the same test set.
    """
    base = Path(root).expanduser()
    help_ = MTD_LAYOUT_HELP
    if not base.is_dir():
        raise TexadError(f"dataset root {str(base)!r} does not exist; {help_}")
    type_dirs = sorted(p for p in base.glob("MT_*") if (p / "Imgs").is_dir())
    if not any(p.name == "MT_Free" for p in type_dirs):
        raise TexadError(f"no {str(base / 'MT_Free' / 'Imgs')!r} folder; {help_}")
    if not 0.0 < train_fraction < 1.0:
        raise TexadError(f"dataset.train_fraction must be in (0, 1), got {train_fraction}")
    normal: list[Sample] = []
    defective: list[Sample] = []
    for type_dir in type_dirs:
        kind = type_dir.name[3:].lower()
        for img in sorted((type_dir / "Imgs").glob("*.jpg")):
            mask = img.with_suffix(".png")
            if not mask.is_file():
                raise TexadError(f"MTD image {str(img)!r} has no mask {str(mask)!r}")
            if kind == "free":
                normal.append(Sample(img, 0, GOOD, mask))
            else:
                defective.append(Sample(img, 1, kind, mask))
    order = np.random.default_rng(seed).permutation(len(normal))
    n_train = max(1, int(round(train_fraction * len(normal))))
    train = [normal[i] for i in sorted(order[:n_train])]
    test = [normal[i] for i in sorted(order[n_train:])] + defective
    return SampleSplit(train=train, test=test, has_masks=True)
