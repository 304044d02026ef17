"""The shared frozen-feature cache (texad.feature_store): exact, computed once per input, safe under
concurrent writers, bounded on disk and clearable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from texad.errors import TexadError
from texad.feature_store import FeatureStore, attach_store, store_at

SRC = Path(__file__).resolve().parents[1] / "src"


class CountingNet:
    """A stand-in frozen network: two maps per image, and how many images it was run on."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.images += images.shape[0]
        return [images.mean(1, keepdim=True) * 2, images[:, :2, ::2, ::2] + 1]


def test_each_input_is_computed_once_and_returned_exactly(tmp_path):
    net, store = CountingNet(), FeatureStore(tmp_path, memory_gb=0)  # no memory layer: every hit reads the disk
    images = torch.randn(3, 3, 8, 8)
    first = store.maps("net", images, net)
    assert net.images == 3 and store.misses == 3
    # the same images again, and in another batch with a new one: only the new one is computed
    again = store.maps("net", images, net)
    mixed = store.maps("net", torch.cat([images[1:2], torch.randn(1, 3, 8, 8), images[0:1]]), net)
    assert net.images == 4 and store.hits_disk == 5
    for a, b in zip(first, again):
        assert torch.equal(a, b) and a.dtype == torch.float32
    for a, b in zip(first, mixed):
        assert torch.equal(a[1], b[0]) and torch.equal(a[0], b[2])
    for a, b in zip(net(images), first):
        assert torch.equal(a, b)
    # another network, or another input tensor (a different size or padding), is another entry
    store.maps("other", images, net)
    store.maps("net", torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect"), net)
    assert net.images == 4 + 3 + 3 + 3  # the line above ran the net on 3 images as the check


def test_memory_layer_is_bounded_and_a_new_process_reads_the_disk(tmp_path):
    net = CountingNet()
    images = torch.randn(4, 3, 16, 16)
    store = FeatureStore(tmp_path, memory_gb=1.5 * 16 * 16 * 4 * 1.25 / 2**30)  # room for one entry only
    store.maps("net", images, net)
    assert len(store._memory) == 1
    fresh = FeatureStore(tmp_path)
    fresh.maps("net", images, net)
    assert net.images == 4 and fresh.hits_disk == 4 and fresh.misses == 0


def test_unreadable_entry_is_recomputed(tmp_path):
    net, store = CountingNet(), FeatureStore(tmp_path, memory_gb=0)
    images = torch.randn(1, 3, 8, 8)
    expected = store.maps("net", images, net)
    path = store.path(store.key("net", images[0]))
    path.write_bytes(b"torn")
    out = store.maps("net", images, net)
    assert net.images == 2 and all(torch.equal(a, b) for a, b in zip(expected, out))
    assert torch.load(path, weights_only=True)[0].shape == expected[0][0].shape  # rewritten whole


def test_disk_cap_evicts_least_recently_used_and_clear_empties(tmp_path):
    net = CountingNet()
    entry_bytes = None
    store = FeatureStore(tmp_path, max_gb=1.0, memory_gb=0)
    old, new = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    store.maps("net", old, net)
    entry_bytes = store.size_bytes()
    past = time.time() - 100
    os.utime(store.path(store.key("net", old[0])), (past, past))
    store.max_bytes = int(1.5 * entry_bytes)  # room for one entry
    store.maps("net", new, net)
    assert not store.path(store.key("net", old[0])).exists()
    assert store.path(store.key("net", new[0])).exists()
    assert store.clear() == 1 and store.size_bytes() == 0
    out = subprocess.run([sys.executable, "-m", "texad.tools.cache", "info", "--dir", str(tmp_path)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    assert json.loads(out.stdout)["entries"] == 0


WRITER = textwrap.dedent("""
    import logging, sys, torch
    from texad.feature_store import FeatureStore
    warnings = []
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("texad.feature_store").addHandler(type("H", (logging.Handler,), {"emit": lambda s, r: warnings.append(r)})())
    store = FeatureStore(sys.argv[1], memory_gb=0)
    image = torch.arange(3 * 64 * 64, dtype=torch.float32).view(1, 3, 64, 64) / 1000
    expected = [image * 2, image[:, :1] - 1]
    path = store.path(store.key("net", image[0]))
    for _ in range(40):
        path.unlink(missing_ok=True)  # force a write now and then while the other process reads or writes
        out = store.maps("net", image, lambda x: [x * 2, x[:, :1] - 1])
        assert all(torch.equal(a, b) for a, b in zip(out, expected))
        out = store.maps("net", image, lambda x: [x * 2, x[:, :1] - 1])
        assert all(torch.equal(a, b) for a, b in zip(out, expected))
    sys.exit(1 if warnings else 0)
""")


def test_two_processes_filling_the_same_entry_corrupt_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    entries = [p for p in tmp_path.rglob("*.pt")]
    assert len(entries) == 1 and not list(tmp_path.rglob("*.tmp"))  # no torn temp file left behind
    image = torch.arange(3 * 64 * 64, dtype=torch.float32).view(3, 64, 64) / 1000
    assert torch.equal(torch.load(entries[0], weights_only=True)[0], image * 2)


def test_attach_store_switch_and_bad_keys(tmp_path):
    class Net:
        feature_store = None

    net = Net()
    attach_store(net, {"enabled": True, "dir": str(tmp_path / "f"), "max_gb": 1, "memory_gb": 0.1}, tmp_path)
    assert net.feature_store is store_at(tmp_path / "f", 1, 0.1)  # one store per folder in a process
    attach_store(net, {"enabled": False}, tmp_path)
    assert net.feature_store is None
    attach_store(net, None, tmp_path)  # an old run config without the key: on, under the cache dir
    assert net.feature_store.root == (tmp_path / "features").absolute()
    with pytest.raises(TexadError, match="feature_cache: unknown keys"):
        attach_store(net, {"enable": False}, tmp_path)


@pytest.mark.slow
def test_two_methods_on_one_set_run_the_backbone_once_per_image(tmp_path, monkeypatch):
    """PatchCore then PaDiM on one tiny set, one feature cache: the second method runs no backbone
    forward at all, each image went through the backbone once, and the metrics equal uncached runs'."""
    from conftest import TINY, compose_cfg
    from texad.backbones import FeatureExtractor
    from texad.feature_store import input_digest
    from texad.pipeline import train

    seen: list[str] = []
    layer_maps = FeatureExtractor.layer_maps

    def counted(self, images):
        seen.extend(input_digest(image) for image in images)
        return layer_maps(self, images)

    monkeypatch.setattr(FeatureExtractor, "layer_maps", counted)

    def run(method, name, *extra):
        overrides = [*TINY, f"method={method}", f"feature_cache.dir={tmp_path}/features", "logger=none",
                     "eval_callbacks.test_outputs.max_overlays_per_type=0", *extra]
        return train(compose_cfg("train", overrides, tmp_path / name))

    patchcore = run("patchcore", "patchcore")
    first = len(seen)
    assert first > 0 and len(set(seen)) == first  # every image computed once, none twice
    padim = run("padim", "padim")
    assert len(seen) == first  # PaDiM read every image's features from the cache
    seen.clear()
    plain = {m: run(m, f"{m}-plain", "feature_cache.enabled=false") for m in ("patchcore", "padim")}
    assert len(seen) >= first  # without the cache the backbone runs again
    for method, cached in (("patchcore", patchcore), ("padim", padim)):
        for key in ("pixel_auroc", "pixel_aupro", "pixel_aupr", "image_auroc", "val"):
            assert cached[key] == plain[method][key], (method, key)  # equal to the last digit
