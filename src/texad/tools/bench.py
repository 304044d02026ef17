"""`python -m texad.tools.bench`: speed and memory figures of this machine, printed as one JSON object.

Each method is measured in its own subprocess (so its peak RSS is its own) on real embedded images:
training images/s (an epoch after the memory bank is built), inference images/s, and the ratio of
inference time to the bare backbone forward pass on the same batch. Each method gets a fresh feature
cache (`texad.feature_store`) in a temp folder, so its first pass over an image computes the backbone
and later epochs read it; `backbone_s` gives the forward on the test batch computed (`no_cache`) and
read from the warm cache (`cache`), and inference is timed both ways (`inference_over_backbone` always
computes the backbone: the method's own cost). Pixel-metric time is measured
on synthetic maps of the requested size; α re-fusion time per point where Sp-CFA exists.

``--fca-core`` adds the FCA core alone (``texad.methods.fca.FCA``, one image per call) on random
feature maps of the sizes in ``FCA_CORE_CASES`` (official WRN50-2 layer2 maps, raw RGB, and
efficientnet_lite0 maps), each in its own subprocess, with its peak extra memory; ``--device cuda``
runs that part on a GPU. ``--calibration`` instead times only the image-score calibration in a
real training run per method (`measure_calibration`). This is the one place for speed scripts (it replaced bench/fca_speed.py and
texad/methods/fca/bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from scipy import ndimage

from texad.backbones import FrozenLayers
from texad.methods.cfa.fusion import time_refusion
from texad.methods.components.fca import FCA
from texad.methods.components.nearest import search_chunk_rows
from texad.metrics.aupimo import aupimo_per_image
from texad.metrics.bootstrap import collect_statistics, intervals
from texad.metrics.functional import aupro, best_f1, pixel_scores, roc_auc
from texad.pipeline import build
from texad.tools import CONF_DIR, compose_train



def _interleaved_median_times(fns: list, repeats: int) -> list[float]:
    """Median time of each function, measured in alternation so that drifts in machine load
    (shared CPUs, frequency changes) hit all of them alike and their ratios stay meaningful."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - t0)
    return [sorted(bucket)[len(bucket) // 2] for bucket in times]


def _median_time(fn, repeats: int) -> float:
    return _interleaved_median_times([fn], repeats)[0]


def _exact_search_floor(model, batch_image) -> tuple[Any, dict[str, Any]] | None:
    """The bare query×centroid products of every CFA view for this batch: the least work any exact
    global nearest-centroid search must do. Its time bounds how close inference can get to the backbone."""
    heads = getattr(getattr(model, "model", None), "heads", None)
    if heads is None:
        return None

    with torch.inference_mode():
        feats = model.model.features(batch_image)
    n_queries = feats.shape[0] * feats.shape[2] * feats.shape[3]
    gen = torch.Generator(device=batch_image.device).manual_seed(0)
    products = []
    for head in heads.values():
        bank = head.bank.centroids
        queries = torch.randn(n_queries, bank.shape[1], generator=gen, device=bank.device)
        rows = search_chunk_rows(bank.shape[0], head.budget_mb, bank.device)
        products.append((queries, bank.t().contiguous(), rows))

    def run():
        with torch.inference_mode():
            for queries, bank_t, rows in products:
                for start in range(0, queries.shape[0], rows):
                    torch.mm(queries[start : start + rows], bank_t)
            if batch_image.is_cuda:
                torch.cuda.synchronize()

    shape = {"views": len(products), "queries": n_queries, "bank": list(heads["org"].bank.centroids.shape)}
    return run, shape


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_method(
    method: str, size: int, n_train: int, batch: int, epochs: int, extra: list[str], repeats: int = 9
) -> dict[str, Any]:
    """Fit `epochs` epochs on the embedded gravel set, then time inference against the backbone."""


    out = tempfile.mkdtemp(prefix="texad-bench-")
    cfg = compose_train(
        [
            f"method={method}",
            "dataset=textures/gravel",
            f"dataset.generated_size={size}",
            f"dataset.image_size={size}",
            f"dataset.n_train={n_train}",
            "dataset.n_val_good=0",
            "dataset.n_test_good=4",
            "dataset.n_per_type=2",
            f"dataset.batch_size={batch}",
            f"dataset.eval_batch_size={batch}",
            "dataset.val_fraction=0",
            "logger=none",
            "trainer.enable_progress_bar=false",
            *([f"method.epochs={epochs}"] if method != "fca" else []),
            *(["method.view_cache=false"] if method == "spcfa" else []),  # a cached view would time no fit
            *extra,
            f"paths.output_dir={out}",
            f"feature_cache.dir={out}/features",
        ],
    )
    L.seed_everything(0)
    datamodule, model = build(cfg)
    result: dict[str, Any] = {"method": method, "image_size": size, "batch": batch}

    epoch_times: list[float] = []

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            epoch_times.append(time.perf_counter() - self.t0)

    if model.prepare_fit(datamodule):
        trainer = L.Trainer(
            accelerator=cfg.trainer.accelerator, devices=1, max_epochs=epochs, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[EpochTimer()],
        )
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        result["fit_s"] = round(time.perf_counter() - t0, 3)
        n_train_images = len(datamodule.train_samples)
        result["epoch_s"] = [round(t, 3) for t in epoch_times]
        steady = epoch_times[1:] or epoch_times
        if steady:  # statistics-only methods (PatchCore, PaDiM) run no epoch: fit_s is their fit
            result["train_images_per_s"] = round(n_train_images * len(steady) / sum(steady), 2)
        result["n_train_images"] = n_train_images
        if getattr(model, "fit_info", {}).get("statistics"):
            result["statistics"] = model.fit_info["statistics"]
    device = torch.device("cuda" if cfg.trainer.accelerator == "gpu" else "cpu")
    model = model.to(device).eval()
    datamodule.setup("test")
    batch_data = next(iter(datamodule.test_dataloader()))
    batch_data = L.pytorch.utilities.move_data_to_device(batch_data, device)
    backbone = model.model.backbone
    frozen = [m for m in model.modules() if isinstance(m, FrozenLayers) and m.feature_store is not None]
    store = frozen[0].feature_store if frozen else None

    def uncached(fn):
        """`fn` with every frozen network of the model computing its maps (the store detached)."""
        def run():
            for m in frozen:
                m.feature_store = None
            try:
                fn()
            finally:
                for m in frozen:
                    m.feature_store = store
        return run

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def backbone_cached():
        with torch.inference_mode():
            backbone(batch_data.image)
        sync()

    def inference_cached():
        with torch.inference_mode():
            model.predict_maps(batch_data)
        sync()

    backbone_forward, inference = uncached(backbone_cached), uncached(inference_cached)
    floor = _exact_search_floor(model, batch_data.image)
    pad = int(getattr(getattr(model, "model", None), "input_padding", 0) or 0)
    if floor and pad:  # CFA's own frozen forward runs on the input padded by method.input_padding

        padded = torch.nn.functional.pad(batch_data.image, (pad,) * 4, mode=model.model.input_padding_mode
                                         if model.model.input_padding_mode != "zeros" else "constant")

        def backbone_padded():
            with torch.inference_mode():
                backbone.compute(padded)
            sync()
    timed = [backbone_forward, inference] + ([floor[0]] if floor else []) + ([backbone_padded] if floor and pad else [])
    if store is not None:
        timed += [backbone_cached, inference_cached]
    n_floor = 1 + bool(floor and pad) if floor else 0
    for fn in timed:  # warm-up (and fills the cache for the batch)
        fn()
    backbone_cached()
    medians = _interleaved_median_times(timed, repeats)
    t_backbone, t_infer = medians[0], medians[1]
    n = len(batch_data)
    result.update(
        backbone_images_per_s=round(n / t_backbone, 2),
        inference_images_per_s=round(n / t_infer, 2),
        inference_over_backbone=round(t_infer / t_backbone, 3),
        peak_rss_mb=round(_peak_rss_mb(), 1),
    )
    result["backbone_s"] = {"no_cache": round(t_backbone, 4)}
    if store is not None:
        result["backbone_s"]["cache"] = round(medians[-2], 4)
        result["inference_s"] = {"no_cache": round(t_infer, 4), "cache": round(medians[-1], 4)}
        result["feature_cache"] = store.stats()
    if floor:
        floor_ratio = medians[2] / t_backbone
        result["exact_search"] = {
            **floor[1],
            "matmul_over_backbone": round(floor_ratio, 3),
            "inference_over_floor": round(t_infer / (t_backbone + medians[2]), 3),
            **({"padded_backbone_over_backbone": round(medians[3] / t_backbone, 3),
                "inference_over_padded_floor": round(t_infer / (medians[3] + medians[2]), 3)} if n_floor == 2 else {}),
            "note": "time of the bare query x centroid products alone (any exact global search computes them), "
            "as a multiple of the backbone forward; inference_over_floor: inference over (backbone + products); "
            "inference_over_padded_floor: over (the backbone on CFA's padded input, method.input_padding, + products)",
        }
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def measure_metrics(n_images: int, size: int, anomalous_fraction: float = 0.03, seed: int = 0) -> dict[str, Any]:
    """Time of all pixel metrics, of AUPRO alone, and of the bootstrap intervals (per-image statistics and
    1 000 replicates, `texad.metrics.bootstrap`) on synthetic maps with blob-shaped defects."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, size, size), bool)
    for i in range(n_images // 2, n_images):
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), 8)
        masks[i] = noise > np.quantile(noise, 1 - 2 * anomalous_fraction)
    maps = (masks * 0.8 + rng.standard_normal(masks.shape) * 0.5).astype(np.float32)
    t_all = _median_time(lambda: pixel_scores(maps, masks), 3)
    t_aupro = _median_time(lambda: aupro(maps, masks), 3)

    t_image = _median_time(lambda: (roc_auc(maps.max((1, 2)), masks.any((1, 2))), best_f1(maps.max((1, 2)), masks.any((1, 2)))), 3)
    labels = masks.any((1, 2)).astype(int)
    maps_t, masks_t = torch.from_numpy(maps), torch.from_numpy(masks)
    paths = [f"image{i}" for i in range(n_images)]
    types = ["good" if y == 0 else "blob" for y in labels]

    def bootstrap():
        stats = collect_statistics(maps_t.flatten(1).amax(1), labels, paths, types, maps_t, masks_t,
                                   aupimo_per_image(maps, masks))
        return intervals(stats)

    t_bootstrap = _median_time(bootstrap, 3)
    return {
        "n_images": n_images,
        "image_size": size,
        "anomalous_pixel_fraction": round(float(masks.mean()), 4),
        "all_six_metrics_s": round(t_all + t_image, 4),
        "aupro_s": round(t_aupro, 4),
        "bootstrap_intervals_s": round(t_bootstrap, 4),
    }


def measure_refusion(n_points: int, n_images: int, size: int) -> dict[str, Any]:
    return time_refusion(n_points=n_points, n_images=n_images, size=size)


#: (label, channels, side) of the FCA core timings: official maps, raw pixels, efficientnet_lite0 maps
FCA_CORE_CASES = [
    ("wrn50 layer2, 64²", 512, 64),
    ("wrn50 layer2, 128²", 512, 128),
    ("raw RGB, 256²", 3, 256),
    ("effnet-lite0 stride 4 (24 ch), 128²", 24, 128),
    ("effnet-lite0 stride 8 (40 ch), 128²", 40, 128),
    ("effnet-lite0 strides 4+8+16 (152 ch), 64²", 152, 64),
]


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def measure_fca_core(channels: int, side: int, repeats: int, device: str = "cpu", patch_size: int = 9,
                     border: str = "valid") -> dict[str, Any]:
    """Seconds per call of the FCA core on one random (1, channels, side, side) map, and its peak
    extra memory (resident set on CPU, allocated on a GPU). Content does not change FCA's cost (it
    counts ranks), so random features are a fair input."""


    torch.manual_seed(0)
    features = torch.rand(1, channels, side, side, device=device)
    fca = FCA(patch_size=patch_size, border=border).to(device)
    fca(features[:, :, :32, :32])  # warm up kernels and the allocator on a small map
    rss_before = _memory_kib("VmRSS:")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fca(features)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    result: dict[str, Any] = {
        "channels": channels, "side": side, "patch_size": patch_size, "border": border, "device": device,
        "seconds_median": round(sorted(times)[len(times) // 2], 4), "seconds_min": round(min(times), 4),
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        result["peak_extra_rss_mib"] = round((_memory_kib("VmHWM:") - rss_before) / 1024, 1)
    return result


def measure_calibration(method: str, size: int, n_train: int, batch: int, epochs: int, extra: list[str]) -> dict[str, Any]:
    """Cost of the image-score calibration in one real training run on the embedded gravel set
    (with validation images, which choose the rule): the k-fold held-out maps and their calibration
    (memory-bank methods, inside the fit) plus the rule choice at the end of every validation pass
    (validation cross-fitting for the others), as a fraction of the run's fit time (wall time for
    methods without a fit). `image_rule_time_s` includes the final validation pass after the fit, so the
    fraction is an upper bound."""
    from texad.pipeline import train

    out = tempfile.mkdtemp(prefix="texad-bench-calibration-")
    cfg = compose_train([
        f"method={method}", "dataset=textures/gravel", f"dataset.generated_size={size}", f"dataset.image_size={size}",
        f"dataset.n_train={n_train}", f"dataset.batch_size={batch}", f"dataset.eval_batch_size={batch}",
        "logger=none", "trainer.enable_progress_bar=false", "eval_callbacks.test_outputs.max_overlays_per_type=0",
        *([f"method.epochs={epochs}"] if method != "fca" else []), *extra, f"paths.output_dir={out}",
    ])
    record = train(cfg)
    kfold_s = float((record.get("statistics") or {}).get("calibration_s") or 0.0)
    select_s = float(record.get("image_rule_time_s") or 0.0)
    base = record.get("fit_time_s") or record.get("wall_time_s")
    return {
        "method": method, "image_size": size, "n_train": n_train, "rule": (record.get("image_score") or {}).get("rule"),
        "kfold_calibration_s": kfold_s, "rule_choice_s_total": select_s,
        "fit_time_s": record.get("fit_time_s"), "wall_time_s": record.get("wall_time_s"),
        "calibration_fraction": round((kfold_s + select_s) / base, 4) if base else None,
        "fraction_of": "fit_time_s" if record.get("fit_time_s") else "wall_time_s",
    }


def _run_child(args: argparse.Namespace, what: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "texad.tools.bench", "--child", what, *args.passthrough]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--methods", default="cfa,spcfa,fca", help="comma-separated method configs to measure")
    p.add_argument("--size", type=int, default=256, help="image side for methods and metrics")
    p.add_argument("--n-train", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2, help="training epochs per method (first one excluded from images/s)")
    p.add_argument("--repeats", type=int, default=9, help="timed repetitions (interleaved) of each inference measurement")
    p.add_argument("--metric-images", type=int, default=144)  # an embedded v2 test set
    p.add_argument("--refusion-points", type=int, default=100)
    p.add_argument("--refusion-images", type=int, default=100)
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for every method (repeatable)")
    p.add_argument("--fca-core", action="store_true", help="also time the FCA core alone on random maps (FCA_CORE_CASES)")
    p.add_argument("--device", default="cpu", help="device of the --fca-core timings (methods follow trainer=)")
    p.add_argument("--patch-size", type=int, default=9, help="FCA patch size of the --fca-core timings")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--calibration", action="store_true",
                   help="only time the image-score calibration in a real training run of each method, as a "
                        "fraction of its fit time (nothing else is measured)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.passthrough = [
        "--size", str(args.size), "--n-train", str(args.n_train), "--batch", str(args.batch),
        "--epochs", str(args.epochs), "--repeats", str(args.repeats), "--metric-images", str(args.metric_images),
        "--refusion-points", str(args.refusion_points), "--refusion-images", str(args.refusion_images),
        "--device", args.device, "--patch-size", str(args.patch_size),
        *[f"--override={o}" for o in args.override],
    ]
    if args.child:
        kind, _, name = args.child.partition(":")
        if kind == "method":
            res = measure_method(name, args.size, args.n_train, args.batch, args.epochs, args.override, args.repeats)
        elif kind == "calibration":
            res = measure_calibration(name, args.size, args.n_train, args.batch, args.epochs, args.override)
        elif kind == "metrics":
            res = measure_metrics(args.metric_images, args.size)
        elif kind == "fca_core":
            channels, side = (int(v) for v in name.split("x"))
            res = measure_fca_core(channels, side, args.repeats, args.device, args.patch_size)
        else:
            res = measure_refusion(args.refusion_points, args.refusion_images, args.size)
        print(json.dumps(res))
        return


    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "methods": {},
    }
    methods = [m for m in args.methods.split(",") if m]
    available = {p.stem for p in (CONF_DIR / "method").glob("*.yaml")}
    if args.calibration:  # only this measurement: one real training run per method
        report["image_score_calibration"] = {
            m: _run_child(args, f"calibration:{m}") if m in available else {"error": "not available"} for m in methods}
        print(json.dumps(report, indent=2))
        return
    for m in methods:
        report["methods"][m] = _run_child(args, f"method:{m}") if m in available else {"error": "not available"}
    if args.fca_core:
        report["fca_core"] = {label: _run_child(args, f"fca_core:{c}x{side}") for label, c, side in FCA_CORE_CASES}
    report["pixel_metrics"] = _run_child(args, "metrics")
    if "spcfa" in available:
        report["alpha_refusion"] = _run_child(args, "refusion")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
