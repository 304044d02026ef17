"""Descriptor options measured on the validation defects of ``study.py`` (never on the test set).

One factor at a time around the current defaults; for each option the raw descriptors and the
head (trained exactly as the method trains it: ``mine_pairs``, ``pair_training_data``,
``anchor_loss``, AdamW, 10 epochs of one anchor per step) are clustered by Ward into the true
number of *validation* types and scored (NMI / ARI / F1), with FCA maps and with the exact masks.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from texad.backbones import FeatureExtractor, concat_layers
from texad.metrics.clustering import adjusted_rand_index, hungarian_f1, normalized_mutual_info
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
from texad.methods.fca.torch_model import scale_features_minmax

BASE = dict(border=0.08, temperature=0.02, pooling="softmax", center="image", standardize=False, normalize=False,
            layers=(0, 1, 2), pool=1, k=3, mutual=False, negative_quantile=0.5)
OPTIONS = [
    {}, {"border": 0.0}, {"temperature": 0.005}, {"temperature": 0.05}, {"temperature": 0.1}, {"temperature": 0.3},
    {"pooling": "threshold"}, {"center": "normal"}, {"center": "normal", "normalize": True},
    {"standardize": True}, {"normalize": True}, {"layers": (0,)}, {"layers": (1,)}, {"layers": (2,)},
    {"layers": (0, 1)}, {"layers": (1, 2)}, {"pool": 3}, {"k": 1}, {"k": 5}, {"k": 5, "mutual": True},
    {"k": 3, "mutual": True}, {"negative_quantile": 0.3}, {"negative_quantile": 0.7},
]


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
    from texad.methods.clustering.study import VALIDATION_TYPES, validation_set
    from texad.methods.fca.lightning_model import FCAMethod

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
