"""`python -m texad.tools.cache {info,clear,evict}`: the shared frozen-feature cache (`texad.feature_store`).

The folder is `feature_cache.dir` of conf/train.yaml, by default `$TEXAD_CACHE/features`
(`~/.cache/texad/features` without TEXAD_CACHE); `--dir` names another. `info` prints its size and
entry count, `clear` deletes every entry, `evict` deletes the least recently used ones beyond `--max-gb`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from texad.feature_store import FeatureStore


def default_dir() -> Path:
    """conf/paths/default.yaml's cache_dir (TEXAD_CACHE, else ~/.cache/texad) / features."""
    root = os.environ.get("TEXAD_CACHE") or str(Path.home() / ".cache" / "texad")
    return Path(root) / "features"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("info", "clear", "evict"))
    p.add_argument("--dir", default=None, help="the feature cache folder (default: $TEXAD_CACHE/features)")
    p.add_argument("--max-gb", type=float, default=8.0, help="disk cap for evict (conf: feature_cache.max_gb)")
    args = p.parse_args(argv)
    store = FeatureStore(args.dir or default_dir(), max_gb=args.max_gb)
    if args.action == "clear":
        removed = store.clear()
        print(json.dumps({"dir": str(store.root), "removed_files": removed}))
        return
    if args.action == "evict":
        removed = store.evict()
        print(json.dumps({"dir": str(store.root), "removed_files": removed, "mb": round(store.size_bytes() / 2**20, 1)}))
        return
    files = store._files()
    print(json.dumps({"dir": str(store.root), "entries": len(files),
                      "mb": round(sum(size for _, size, _ in files) / 2**20, 1), "max_gb": args.max_gb}))


if __name__ == "__main__":
    main()
