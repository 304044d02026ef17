"""Maps stored by an earlier run (``method.maps_dir``): where the test output writer put each map, and
reading them back checked against the data set (one per test image, nothing else, the model's size)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from texad.artifacts import sample_name
from texad.errors import TexadError
from texad.outputs import read_npz_array


def stored_map_path(maps_dir: Path, path: str, defect_type: str) -> Path:
    """Where the test output writer puts an image's map: <maps_dir>/<defect_type>/<image stem>.npz."""
    return maps_dir / defect_type / f"{sample_name(path)}.npz"


def load_stored_maps(maps_dir: str | Path, samples: list, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Every test image's stored map (float32, H×W), checked against the data set: one file per
    test image, nothing else in the folder, each of the model's image size."""
    root = Path(str(maps_dir)).expanduser()
    if (root / "maps").is_dir() and not any(root.glob("*/*.npz")):
        root = root / "maps"  # a run dir was given: use its maps/
    if not root.is_dir():
        raise TexadError(f"method.maps_dir: folder {str(root)!r} does not exist")
    expected = {stored_map_path(root, str(s.path), s.defect_type): s for s in samples}
    found = set(root.glob("*/*.npz"))
    missing = sorted(str(p.relative_to(root)) for p in expected if p not in found)
    extra = sorted(str(p.relative_to(root)) for p in found if p not in expected)
    if missing or extra:
        raise TexadError(
            f"method.maps_dir {str(root)!r} holds {len(found)} maps but the test set has {len(expected)} images"
            f" ({len(missing)} missing, e.g. {missing[:3]}; {len(extra)} not in the test set, e.g. {extra[:3]}); "
            "expected <maps_dir>/<defect_type>/<image stem>.npz for every test image of this data set"
        )
    maps = {}
    for file, sample in expected.items():
        try:
            amap = np.asarray(read_npz_array(file, "anomaly_map"), dtype=np.float32)
        except Exception as err:
            raise TexadError(f"method.maps_dir: cannot read 'anomaly_map' from {str(file)!r}: {err}") from err
        if amap.shape != tuple(image_size):
            raise TexadError(
                f"method.maps_dir: map {str(file)!r} is {amap.shape[0]}x{amap.shape[1] if amap.ndim > 1 else ''} "
                f"but the data set's images are {image_size[0]}x{image_size[1]} (dataset.image_size)"
            )
        maps[str(sample.path)] = torch.from_numpy(amap)
    return maps
