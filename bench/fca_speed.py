"""Time FCA per image and its peak extra memory on this machine's CPU (or a GPU with --device).

Each case runs in a fresh subprocess so its peak resident memory is its own. Usage:
    PYTHONPATH=src python3 bench/fca_speed.py [--threads N] [--repeats R] [--device cpu|cuda]
    PYTHONPATH=src python3 bench/fca_speed.py --method [--feature-input-size 1024]
``--method`` times the whole method per 256² image instead (resize, efficientnet_lite0 features
or raw pixels, FCA, upsample) through ``texad.methods.fca.bench.time_fca``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

# (label, channels, side): the brief's sizes plus efficientnet_lite0 maps of a 256²-1024² input.
CASES = [
    ("wrn50 layer2, 64²", 512, 64),
    ("wrn50 layer2, 128²", 512, 128),
    ("raw RGB, 256²", 3, 256),
    ("effnet-lite0 stride 8 (40 ch), 128²", 40, 128),
    ("effnet-lite0 strides 4+8+16 (152 ch), 64²", 152, 64),
]


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def run_case(channels: int, side: int, repeats: int, threads: int, device: str, patch_size: int) -> dict:
    import torch

    from texad.methods.fca import FCA

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    features = torch.rand(1, channels, side, side, device=device)
    fca = FCA(patch_size=patch_size).to(device)
    fca(features[:, :, :32, :32])  # warm up kernels and allocator on a small map
    rss_before = _memory_kib("VmRSS:")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fca(features)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {"seconds_median": sorted(times)[len(times) // 2], "seconds_min": min(times),
              "threads": torch.get_num_threads()}
    if device == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        result["peak_extra_rss_mib"] = (_memory_kib("VmHWM:") - rss_before) / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patch-size", type=int, default=9)
    parser.add_argument("--method", action="store_true", help="time the whole method per 256² image")
    parser.add_argument("--feature-input-size", type=int, default=1024)
    parser.add_argument("--case", nargs=2, type=int, metavar=("CHANNELS", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        from texad.methods.fca.bench import time_fca

        for features in ("backbone", "pixels"):
            r = time_fca(features, feature_input_size=args.feature_input_size, patch_size=args.patch_size,
                         repeats=args.repeats, threads=args.threads or None, device=args.device)
            print(json.dumps(r), flush=True)
        return
    if args.case:
        print(json.dumps(run_case(*args.case, args.repeats, args.threads, args.device, args.patch_size)))
        return
    print(f"FCA t={args.patch_size}, stride 1, chunk_rows 8, device {args.device}, one image per call")
    for label, channels, side in CASES:
        cmd = [sys.executable, __file__, "--case", str(channels), str(side), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--device", args.device, "--patch-size", str(args.patch_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        memory = (f"peak GPU {r['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in r
                  else f"peak extra RSS {r['peak_extra_rss_mib']:.0f} MiB")
        print(f"{label:45s} C={channels:4d} {side:4d}²  median {r['seconds_median']:.3f} s  "
              f"min {r['seconds_min']:.3f} s  ({r['threads']} threads)  {memory}", flush=True)


if __name__ == "__main__":
    main()
