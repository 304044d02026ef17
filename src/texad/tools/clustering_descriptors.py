"""Descriptor options measured on validation defects (never on the test set), for ``clustering_study``.

The validation set: normal *training* images of an embedded set, each with one defect from five
generators that are not the test set's families (``VALIDATION_TYPES``).

One factor at a time around the current defaults; for each option the raw descriptors and the
head (trained exactly as the method trains it: ``mine_pairs``, ``pair_training_data``,
``anchor_loss``, AdamW, 10 epochs of one anchor per step) are clustered by Ward into the true
number of *validation* types and scored (NMI / ARI / F1), with FCA maps and with the exact masks.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import torch

from texad.backbones import FeatureExtractor, concat_layers
from texad.data.embedded import ensure_texture_set
from texad.data.images import read_rgb, resize_rgb
from texad.methods.clustering.lightning_model import image_descriptors
from texad.methods.clustering.number import cut_tree, ward_linkage
from texad.methods.clustering.torch_model import (
    ClusteringModel,
    maps_on_cells,
    anchor_loss,
    clear_border,
    mine_pairs,
    pair_training_data,
)
from texad.methods.components.feature_maps import scale_features_minmax
from texad.methods.fca.lightning_model import FCAMethod
from texad.metrics.clustering import adjusted_rand_index, hungarian_f1, normalized_mutual_info

BASE = dict(border=0.08, temperature=0.02, pooling="softmax", center="image", standardize=False, normalize=False,
            layers=(0, 1, 2), pool=1, k=3, mutual=False, negative_quantile=0.5)
OPTIONS = [
    {}, {"border": 0.0}, {"temperature": 0.005}, {"temperature": 0.05}, {"temperature": 0.1}, {"temperature": 0.3},
    {"pooling": "threshold"}, {"center": "normal"}, {"center": "normal", "normalize": True},
    {"standardize": True}, {"normalize": True}, {"layers": (0,)}, {"layers": (1,)}, {"layers": (2,)},
    {"layers": (0, 1)}, {"layers": (1, 2)}, {"pool": 3}, {"k": 1}, {"k": 5}, {"k": 5, "mutual": True},
    {"k": 3, "mutual": True}, {"negative_quantile": 0.3}, {"negative_quantile": 0.7},
]



VALIDATION_TYPES = ("disc", "stripes", "blur", "noise", "tint")


def plant_validation_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A copy of a uint8 (H, W, 3) image with one defect of a validation type, and its bool mask.

    Shapes are ellipses (disc, tint, blur, noise) or a rotated rectangle (stripes) of 1–4 % of the
    image, away from the border; deliberately simple and unlike the test families.
    """
    h, w = image.shape[:2]
    side = min(h, w)
    img = image.astype(np.float32)
    std = max(float(img.std()), 8.0)
    area = rng.uniform(0.01, 0.04) * h * w
    aspect = rng.uniform(1.0, 2.0)
    ry, rx = np.sqrt(area / np.pi * aspect), np.sqrt(area / np.pi / aspect)
    margin = int(0.1 * side + max(ry, rx))
    cy, cx = rng.uniform(margin, h - margin), rng.uniform(margin, w - margin)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    if kind == "stripes":
        mask = (np.abs(u) <= rx * 1.2) & (np.abs(v) <= ry * 0.9)
        period = rng.uniform(3, 6) * side / 256
        pattern = np.sin(2 * np.pi * u / period)[..., None] * 1.5 * std
        target = img.mean((0, 1)) + pattern
    else:
        mask = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
        if kind == "disc":
            colour = img.mean((0, 1)) + rng.choice([-1, 1]) * rng.uniform(1.5, 2.5) * std
            target = np.broadcast_to(colour, img.shape)
        elif kind == "blur":
            target = cv2.GaussianBlur(img, (0, 0), sigmaX=side / 40)
        elif kind == "noise":
            target = img + rng.normal(0, 1.5 * std, img.shape[:2])[..., None]
        elif kind == "tint":
            target = img.copy()
            channel = rng.integers(0, 3)
            target[..., channel] += 1.5 * std
            target[..., (channel + 1) % 3] -= 0.5 * std
        else:
            raise ValueError(kind)
    out = np.where(mask[..., None], target, img)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), mask


def validation_set(texture: str, per_type: int, image_size: int, seed: int = 0):
    """Images (N,3,H,W normalised as the backbone expects), masks and types, from the normal
    *training* images of the embedded set (never its test images)."""


    cache = Path(os.environ.get("TEXAD_CACHE", Path.home() / ".cache/texad")) / "textures/s256_n40-12-8_seed0"
    root = ensure_texture_set(texture, cache, 256, 40, 12, 8, None, 0)
    train = sorted((root / "train" / "good").glob("*.png"))
    rng = np.random.default_rng(seed)
    images, masks, types = [], [], []
    order = rng.permutation(len(train))
    for t, kind in enumerate(VALIDATION_TYPES):
        for j in range(per_type):
            base = resize_rgb(read_rgb(train[order[(t * per_type + j) % len(train)]]), (image_size, image_size))
            image, mask = plant_validation_defect(base, kind, rng)
            images.append(image)
            masks.append(mask)
            types.append(kind)
    return images, masks, types


def _to_tensor(images: list[np.ndarray], mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _scores(pred, target) -> dict[str, float]:
    return {"nmi": normalized_mutual_info(pred, target), "ari": adjusted_rand_index(pred, target),
            "f1": hungarian_f1(pred, target)}


def _train_head(model: ClusteringModel, features, maps, opt, seed: int = 0, epochs: int = 10) -> None:
    maps = clear_border(maps, opt["border"])
    raw = image_descriptors(model, maps, False, opt["temperature"], opt["pooling"], 0.5, opt["center"],
                            opt["standardize"], opt["normalize"], features=features)
    positives, negatives = mine_pairs(raw, opt["k"], opt["negative_quantile"], opt["mutual"])
    data = pair_training_data(features, maps, positives, negatives, 0.5)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=5e-4, weight_decay=0.01)
    n = features.shape[0]
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        for a in order:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            loss = anchor_loss(model.head, data, a, g, 5, 20, 50, 0.5)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1


def study_descriptors(texture: str, per_type: int = 8, image_size: int = 256, only: list[int] | None = None,
                      sources: list[str] | None = None) -> dict:

    t0 = time.time()
    backbone = FeatureExtractor("efficientnet_lite0", (1, 2, 3), mean=(0.5,) * 3, std=(0.5,) * 3)
    images, masks, types = validation_set(texture, per_type, image_size)
    x = _to_tensor(images, backbone.mean, backbone.std)
    classes = sorted(set(types))
    target = np.array([classes.index(t) for t in types])
    cache = Path(tempfile.gettempdir()) / f"texad-clustering-validation-{texture}-{per_type}-{image_size}.pt"
    if cache.is_file():
        layer_maps, fca_maps = torch.load(cache)
    else:
        with torch.no_grad():
            layer_maps = [torch.cat(parts) for parts in zip(*[backbone(x[i:i + 8]) for i in range(0, len(x), 8)])]
            fca = FCAMethod(backbone, layers=[1], feature_input_size=512)
            fca_maps = torch.cat([fca.predict_maps(SimpleNamespace(image=x[i:i + 8]))["anomaly_map"]
                                  for i in range(0, len(x), 8)])
        torch.save((layer_maps, fca_maps), cache)
    full_maps = {"fca": fca_maps, "gt": torch.from_numpy(np.stack(masks)).float()}
    # normal statistics from other training images: the validation bases' own normal pixels
    print(f"[{texture}] features and FCA maps in {time.time() - t0:.0f} s", flush=True)
    results = []
    for index, option in enumerate(OPTIONS):
        if only is not None and index not in only:
            continue
        opt = {**BASE, **option}
        grids = backbone.grids(x.shape[-2:], layer_maps)
        cat, grid = concat_layers([layer_maps[i] for i in opt["layers"]], [grids[i] for i in opt["layers"]], opt["pool"])
        feats = scale_features_minmax(cat)
        cells = tuple(feats.shape[-2:])
        for source, full in full_maps.items():
            if sources is not None and source not in sources:
                continue
            maps = maps_on_cells(full, grid, cells)
            torch.manual_seed(0)
            model = ClusteringModel(backbone, 256, None, opt["layers"], opt["pool"],
                                    4096 if (opt["center"] == "normal" or opt["standardize"]) else 0)
            if model.normal_pixels.shape[0]:
                # normal pixels: locations the masks leave untouched, seeded sample
                flat = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
                keep = (maps_on_cells(full_maps["gt"], grid, cells) == 0).reshape(-1)
                pool = flat[keep]
                pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:4096]
                model.normal_pixels.copy_(pool[pick])
            row = {"option": option, "maps": source}
            for kind in ("raw", "head"):
                if kind == "head":
                    _train_head(model, feats, maps, opt)
                with torch.no_grad():
                    d = image_descriptors(model, clear_border(maps, opt["border"]), kind == "head", opt["temperature"],
                                          opt["pooling"], 0.5, opt["center"], opt["standardize"], opt["normalize"],
                                          features=feats)
                z = ward_linkage(d)
                row[kind] = _scores(cut_tree(z, len(classes)), target)
            results.append(row)
            print(f"[{texture}] {source:3s} {str(option):45s} raw NMI {row['raw']['nmi']:.3f}  "
                  f"head NMI {row['head']['nmi']:.3f}  (F1 {row['raw']['f1']:.2f} / {row['head']['f1']:.2f})",
                  flush=True)
    return {"texture": texture, "types": list(VALIDATION_TYPES), "per_type": per_type, "results": results}
