"""One cache of frozen backbone features, shared by every method, seed and sweep point.

A frozen network's maps for an input depend on the network (architecture, weights, layers) and on
the input tensor alone. So `FeatureStore` keys each image's maps by the network's identity and a
hash of the exact input tensor the network sees: that tensor already carries the image content, the
input size, the normalisation and any input padding, so every method that feeds the same tensor to
the same network (CFA, PatchCore, PaDiM and the clustering method read `FeatureExtractor`; FCA and the
blind VAE read a `LayerView` of it) shares the entry, across epochs, seeds and runs. Alignment
(`backbone.alignment`) decides only where cells sit, not the maps, so it is not part of the key.

Entries are float32 tensors exactly as the network returned them (bit-identical results), kept in a
bounded in-process memory layer and on disk under `<cache_dir>/features/<2 hex>/<key>.pt`:

- concurrent runs: every write goes to a temp file in the same folder and is moved into place with
  `os.replace`, so a reader sees a whole entry or none; two processes filling the same entry write
  the same bytes, and the later replace wins. An unreadable entry is a miss (recomputed, rewritten).
- bounded: past `max_gb` on disk, the least recently used entries (by mtime, touched on every disk
  hit) are deleted until the store is under 90 % of the cap.
- clearable: `python -m texad.tools.cache clear` (or `FeatureStore(root).clear()`).

On a CPU the network runs one image at a time (`texad.backbones.CPU_MICRO_BATCH`), so an image's maps
do not depend on which other images share its batch, and cached maps equal uncached ones to the bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from texad.errors import TexadError
from texad.outputs import atomic_write

log = logging.getLogger(__name__)

__all__ = ["FeatureStore", "attach_store", "store_at"]

#: bump when what is stored per entry changes
STORE_VERSION = 1
#: temp files older than this (seconds) are leftovers of a killed process and are removed by a scan
STALE_TEMP_S = 3600.0


def input_digest(image: torch.Tensor) -> str:
    """Hash of one input tensor: dtype, shape and bytes (the image content, size, normalisation, padding)."""
    t = image.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureStore:
    """Maps of a frozen network per input image: memory layer → disk entry → computed (and stored)."""

    def __init__(self, root: str | os.PathLike[str], max_gb: float = 8.0, memory_gb: float = 1.0) -> None:
        if max_gb <= 0 or memory_gb < 0:
            raise TexadError(f"feature_cache.max_gb must be > 0 and feature_cache.memory_gb >= 0, "
                             f"got {max_gb} and {memory_gb}")
        self.root = Path(root).expanduser().absolute()
        self.max_bytes, self.memory_bytes = int(max_gb * 2**30), int(memory_gb * 2**30)
        self._memory: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self._memory_used = 0
        self._disk_used: int | None = None  # bytes on disk at the last scan plus what was written since
        self.hits_memory = self.hits_disk = self.misses = 0
        self._write_failed = False  # warned once that entries cannot be stored

    # --- lookup ----------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    @staticmethod
    def key(network: str, image: torch.Tensor) -> str:
        return hashlib.sha1(f"{STORE_VERSION}|{network}|{input_digest(image)}".encode()).hexdigest()

    def maps(self, network: str, images: torch.Tensor,
             compute: Callable[[torch.Tensor], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """`compute(images)` (a list of (B, C_l, h_l, w_l) maps), computed only for the images not stored.

        `network` identifies the network (`FrozenLayers.store_identity`); the result is on `images`' device.
        """
        # the same input on another device type or under autocast gives other bits: another entry
        device = images.device.type
        if torch.is_autocast_enabled(device):
            network = f"{network}|{device}|autocast-{torch.get_autocast_dtype(device)}"
        elif device != "cpu":
            network = f"{network}|{device}"
        keys = [self.key(network, image) for image in images]
        found: dict[int, list[torch.Tensor]] = {}
        for i, key in enumerate(keys):
            entry = self._load(key)
            if entry is not None:
                found[i] = entry
        todo = [i for i in range(len(keys)) if i not in found]
        if todo:
            computed = compute(images[todo])
            self.misses += len(todo)
            for row, i in enumerate(todo):
                entry = [m[row].detach().to("cpu").clone() for m in computed]
                self._remember(keys[i], entry)
                self._write(keys[i], entry)
                found[i] = entry
        n_maps = len(found[0])
        return [torch.stack([found[i][k] for i in range(len(keys))]).to(images.device) for k in range(n_maps)]

    def _load(self, key: str) -> list[torch.Tensor] | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits_memory += 1
            return self._memory[key]
        path = self.path(key)
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            os.utime(path)  # recently used: evicted last
        except FileNotFoundError:
            return None
        except Exception as err:  # a torn or foreign file: recomputed and replaced
            log.warning("feature cache entry %s is unreadable (%s); recomputing it", path, err)
            return None
        if not isinstance(entry, list) or not all(isinstance(t, torch.Tensor) for t in entry):
            log.warning("feature cache entry %s does not hold a list of tensors; recomputing it", path)
            return None
        self.hits_disk += 1
        self._remember(key, entry)
        return entry

    def _remember(self, key: str, entry: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry)
        if key in self._memory or size > self.memory_bytes:  # an input twice in one batch is counted once
            return
        self._memory[key] = entry
        self._memory_used += size
        while self._memory_used > self.memory_bytes:
            _, old = self._memory.popitem(last=False)
            self._memory_used -= sum(t.numel() * t.element_size() for t in old)

    # --- disk --------------------------------------------------------------------------------------
    def _write(self, key: str, entry: list[torch.Tensor]) -> None:
        path = self.path(key)
        try:  # temp file + os.replace, with the umask's mode (a colleague's run reads it)
            atomic_write(path, lambda tmp: torch.save(entry, tmp))
        except TexadError as err:  # a full or read-only cache folder costs speed, not the run
            if not self._write_failed:
                log.warning("feature cache: %s; features are computed but no longer stored", err)
            self._write_failed = True
            return
        if self._disk_used is None:
            self._disk_used = self.size_bytes()
        else:
            try:
                self._disk_used += path.stat().st_size
            except FileNotFoundError:  # another process evicted or cleared it meanwhile
                pass
        if self._disk_used > self.max_bytes:
            self.evict()

    def _files(self) -> list[tuple[float, int, Path]]:
        """(mtime, bytes, path) of every entry; removes stale temp files of killed writers."""
        out = []
        if not self.root.is_dir():
            return out
        now = time.time()
        for folder, _, names in os.walk(self.root):
            for name in names:
                p = Path(folder) / name
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                if name.endswith(".tmp"):
                    if now - st.st_mtime > STALE_TEMP_S:
                        p.unlink(missing_ok=True)
                    continue
                out.append((st.st_mtime, st.st_size, p))
        return out

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self._files())

    def evict(self, target_fraction: float = 0.9) -> int:
        """Delete least recently used entries until the store is under `target_fraction` of its cap."""
        files = sorted(self._files())
        used = sum(size for _, size, _ in files)
        removed = 0
        for _, size, path in files:
            if used <= target_fraction * self.max_bytes:
                break
            path.unlink(missing_ok=True)  # another process may have removed it already
            used -= size
            removed += 1
        self._disk_used = used
        if removed:
            log.info("feature cache %s: evicted %d entries (now %.1f MB)", self.root, removed, used / 2**20)
        return removed

    def clear(self) -> int:
        """Delete every entry (and the memory layer); returns the number of files removed."""
        files = self._files()
        for _, _, path in files:
            path.unlink(missing_ok=True)
        self._memory.clear()
        self._memory_used, self._disk_used = 0, 0
        return len(files)

    def stats(self) -> dict[str, Any]:
        return {"hits_memory": self.hits_memory, "hits_disk": self.hits_disk, "misses": self.misses}

    def __getstate__(self) -> dict[str, Any]:  # spawned workers get the store without its memory layer
        state = dict(self.__dict__)
        state["_memory"], state["_memory_used"] = OrderedDict(), 0
        return state


_STORES: dict[tuple[str, int, int], FeatureStore] = {}


def store_at(root: str | os.PathLike[str], max_gb: float = 8.0, memory_gb: float = 1.0) -> FeatureStore:
    """The process's store at `root` (one memory layer per folder, shared by every network in the process)."""
    store = FeatureStore(root, max_gb, memory_gb)
    key = (str(store.root), store.max_bytes, store.memory_bytes)
    return _STORES.setdefault(key, store)


def attach_store(backbone: Any, conf: Any, cache_dir: str | os.PathLike[str]) -> None:
    """Give `backbone` (a `texad.backbones.FrozenLayers`) the store that `conf` (the `feature_cache` config:
    enabled, dir, max_gb, memory_gb) asks for; `enabled: false` leaves it without one."""
    conf = dict(conf or {})
    unknown = set(conf) - {"enabled", "dir", "max_gb", "memory_gb"}
    if unknown:
        raise TexadError(f"feature_cache: unknown keys {sorted(unknown)} (expected enabled, dir, max_gb, memory_gb)")
    if not conf.get("enabled", True):
        backbone.feature_store = None
        return
    root = conf.get("dir") or Path(str(cache_dir)) / "features"
    backbone.feature_store = store_at(root, float(conf.get("max_gb", 8.0)), float(conf.get("memory_gb", 1.0)))


def describe_network(kind: str, description: str, weights: str) -> str:
    """The identity string of a frozen network: its class, layers and a digest of its weights."""
    return json.dumps({"kind": kind, "network": description, "weights": weights}, sort_keys=True)
