"""Decoding images and masks from disk, with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from texad.errors import TexadError


def read_rgb(path: str | Path) -> np.ndarray:
    """uint8 (H,W,3) RGB; grayscale is repeated to 3 channels, 16-bit is scaled to 8-bit."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        if not Path(path).is_file():
            raise TexadError(f"image file {str(path)!r} does not exist")
        raise TexadError(f"cannot read image {str(path)!r}: corrupt or not an image file")
    if arr.dtype == np.uint16:
        arr = (arr / 257.0).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = cv2.normalize(arr, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 4:
        return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def read_mask_levels(path: str | Path, image_path: str | Path, image_shape: tuple[int, int]) -> np.ndarray:
    """uint8 (H,W) grey levels of a mask file, which must match its image's size at the original resolution."""
    arr = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if arr is None:
        raise TexadError(f"cannot read mask {str(path)!r}: corrupt or not an image file")
    if arr.shape[:2] != tuple(image_shape):
        raise TexadError(
            f"mask {str(path)!r} is {arr.shape[1]}x{arr.shape[0]} but its image {str(image_path)!r} is "
            f"{image_shape[1]}x{image_shape[0]} (width x height); they must be equal"
        )
    return arr


def read_mask(path: str | Path, image_path: str | Path, image_shape: tuple[int, int]) -> np.ndarray:
    """bool (H,W) mask: a pixel > 0 is defective."""
    return read_mask_levels(path, image_path, image_shape) > 0


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """An image size from config: one int (square) or [height, width]."""
    if isinstance(size, int):
        return size, size
    h, w = (int(v) for v in size)
    return h, w


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    interp = cv2.INTER_AREA if image.shape[0] > h else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interp)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-average then threshold at 0.5, so thin defects survive a modest downscale fairly."""
    h, w = size
    if mask.shape == (h, w):
        return mask
    small = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return small >= 0.5


def to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (H,W,3) → normalised float (3,H,W)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (3,H,W) → uint8 (H,W,3), for pictures."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    x = (image.detach().cpu().float() * s + m).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def image_header(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels.

    PIL reads the header and `verify()` walks the file's structure (for PNG every chunk and its CRC)
    without decoding, so a corrupt or truncated file is found at a fraction of a decode's cost. A file
    PIL does not know is decoded by OpenCV (the reader used later) before it is called unreadable.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            image.verify()
        return int(height), int(width)
    except FileNotFoundError:
        raise TexadError(f"image file {str(path)!r} does not exist") from None
    except Exception:  # noqa: BLE001 - any PIL failure: let the real reader decide
        arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise TexadError(f"cannot read image {str(path)!r}: corrupt or not an image file") from None
        return int(arr.shape[0]), int(arr.shape[1])


def mask_levels(path: str | Path, image_path: str | Path, image_shape: tuple[int, int]) -> tuple[int, bool]:
    """(defective pixel count, binary?) of a mask file checked against its image's size.

    The rule that binarises a mask (`read_mask`): a pixel > 0 is defective. Binary means at most two
    grey levels, one of them 0 (e.g. 0/255 or 0/1).
    """
    arr = read_mask_levels(path, image_path, image_shape)
    defect = arr > 0
    count = int(np.count_nonzero(defect))
    binary = count == 0 or bool((arr[defect] == arr[defect][0]).all())
    return count, binary
