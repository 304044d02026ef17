"""Writing results so that nothing is ever half-written: temp file in the same folder, then rename."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from texad.errors import TexadError

METRIC_KEYS = ("pixel_auroc", "pixel_aupro", "pixel_aupr", "pixel_f1", "image_auroc", "image_f1", "pixel_aupimo")


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells it (Linux), else set and reset."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path, directory: bool = False) -> None:
    """Give `path` the mode a plain open()/mkdir() would have: mkstemp makes files 0600 and mkdtemp
    folders 0700, so results written through them would be unreadable to the group (0644/0755 under 022)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def make_temp_dir(prefix: str, dir: str | Path) -> Path:
    """tempfile.mkdtemp with the umask's mode, for folders built aside and moved into place with os.replace."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    follow_umask(tmp, directory=True)
    return tmp


def writable_dir(path: str | Path, what: str) -> Path:
    """Create `path` (and parents) or say in one line why it cannot be: read-only, no permission, disk full."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TexadError(f"{what} {str(path)!r} cannot be created: {err.strerror or err}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise TexadError(f"{what} {str(path)!r} is not writable (read-only or no permission); "
                         f"choose another one (e.g. TEXAD_CACHE=/path or paths.cache_dir=/path)")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_path) on a temp file next to `path`, fsync it, give it the umask's mode, then
    os.replace it into place. A full disk or a read-only folder is one TexadError naming the file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise TexadError(f"cannot write {str(path)!r}: {err.strerror or err} (read-only or full folder?)") from err
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        follow_umask(tmp)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise TexadError(f"cannot write {str(path)!r}: {err.strerror} (folder {str(path.parent)!r})") from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf → null, tensors and numpy scalars → python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def digest(description: Any) -> str:
    """sha256 of a JSON description (sorted keys): a cache key."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    text = json.dumps(_clean(data), indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


_NPZ_READ_LOCK = threading.Lock()


def read_npz_array(path: str | Path, key: str):
    """One array from an .npz file, read under a process-wide lock.

    numpy parses each array header with ``ast.literal_eval``, and CPython 3.11's parser is not
    thread-safe ("AST constructor recursion depth mismatch"), so concurrent readers in threads
    (thread pools, threaded loaders) would fail at random without the lock. Arrays are small;
    the lock costs nothing measurable.
    """
    with _NPZ_READ_LOCK, np.load(path) as stored:
        return stored[key]


def read_torch_file(path: str | Path, what: str, weights_only: bool = True) -> Any:
    """torch.load with errors that name the file and the config key it came from."""


    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise TexadError(f"{what} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:
        raise TexadError(f"{what}: cannot read {str(path)!r}: {err}") from err
