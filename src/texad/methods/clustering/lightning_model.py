"""Anomaly clustering (Ardelean & Weyrich 2024) as a texad method: maps → descriptors → head → Ward.

The whole job runs inside the ordinary train/test flow:

* ``prepare_fit`` takes the *anomalous test images* (the clustered set; ``include_good`` adds the
  normal ones as one more class), computes their backbone features and anomaly maps (FCA, the
  ground-truth masks, or maps stored by an earlier run), builds the map-weighted descriptors, mines
  positive / negative images, and hands the trainer a loader of anchor images.
* the fit trains the head with the pixel-pair contrastive loss (``torch_model.contrastive_loss``).
* the test step reports the maps as this method's anomaly maps (pixel / image metrics as usual);
  ``on_test_epoch_end`` clusters the descriptors without and with the head (Ward), adds
  ``nmi, ari, cluster_f1`` (with the head) and ``raw_nmi, raw_ari, raw_cluster_f1`` (without) to
  the test results, and writes ``clusters.csv`` and ``clusters.png`` to the run dir.

Which images are clustered uses the test labels (the paper's evaluation setting: clustering
anomalous images into defect types), never the defect types.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from texad.backbones import FeatureExtractor
from texad.data.batch import Batch, collate
from texad.data.datamodule import EpochSeededShuffle
from texad.errors import TexadError
from texad.methods.base import AnomalyModule
from texad.methods.clustering.torch_model import (
    ClusteringModel,
    attention_weights,
    contrastive_loss,
    mine_pairs,
    normalise_maps,
    smooth_and_center,
    split_pixels,
    ward_clusters,
    weighted_descriptors,
)
from texad.metrics.clustering import ClusteringMetrics
from texad.outputs import read_npz_array
from texad.writers import sample_name

log = logging.getLogger(__name__)

MAP_SOURCES = ("fca", "gt")


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


class AnomalyClustering(AnomalyModule):
    """Clusters anomalous images by defect type with anomaly-map-attended descriptors and a
    contrastively trained head; see the module docstring for the flow and ``torch_model`` for the
    parts."""

    def __init__(
        self,
        backbone: FeatureExtractor,
        name: str = "clustering",
        maps_from: str = "fca",
        maps_dir: str | None = None,
        n_clusters: int | None = None,
        include_good: bool = False,
        temperature: float = 0.02,
        feature_blur_kernel: int = 7,
        feature_blur_sigma: float = 2.0,
        k: int = 3,
        negative_quantile: float = 0.5,
        n_negatives: int = 5,
        anomalous_level: float = 0.5,
        anchor_pixels: int = 20,
        pair_pixels: int = 50,
        margin: float = 0.5,
        hidden_channels: int = 256,
        out_channels: int | None = None,
        epochs: int = 10,
        anchors_per_step: int = 1,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        fca: dict | None = None,
        fca_layers: tuple[int, ...] = (0,),
        seed: int = 0,
    ) -> None:
        super().__init__()
        if maps_dir is None and maps_from not in MAP_SOURCES:
            raise TexadError(f"method.maps_from must be one of {list(MAP_SOURCES)} (or set method.maps_dir), got {maps_from!r}")
        for key, value, least in (("k", k, 1), ("n_negatives", n_negatives, 1), ("anchor_pixels", anchor_pixels, 1),
                                  ("pair_pixels", pair_pixels, 1), ("anchors_per_step", anchors_per_step, 1),
                                  ("epochs", epochs, 0)):
            if int(value) < least:
                raise TexadError(f"method.{key} must be at least {least}, got {value}")
        if n_clusters is not None and int(n_clusters) < 1:
            raise TexadError(f"method.n_clusters must be at least 1 (or null: the number of defect types), got {n_clusters}")
        if margin <= 0:
            raise TexadError(f"method.margin must be positive, got {margin}")
        self.save_hyperparameters(ignore=["backbone"])
        self.model = ClusteringModel(backbone, hidden_channels, out_channels, fca, tuple(fca_layers))
        self.metrics["test_cluster"] = ClusteringMetrics()
        self.metrics["test_cluster_raw"] = ClusteringMetrics()
        self.maps_source = "dir" if maps_dir else maps_from
        self.epoch_losses: list[float] = []  # mean training loss per epoch (for tests and the record)
        self.fit_info: dict[str, Any] = {}
        self._cache: dict[str, dict[str, torch.Tensor]] = {}  # image path → features / maps
        self._stored_maps: dict[str, torch.Tensor] | None = None
        self._train: dict[str, torch.Tensor] = {}
        self._loss_sum = self._loss_count = 0.0
        self._test_paths: list[tuple[str, str, int]] = []

    # --- which images, and their features and maps -------------------------------------------
    def _clustered(self, label: int) -> bool:
        return label == 1 or (self.hparams.include_good and label == 0)

    def _check_sizes(self, n_images: int, n_classes: int, where: str) -> int:
        """The number of clusters, after checking that k and n_clusters fit the clustered set."""
        what = "test images" if self.hparams.include_good else "anomalous test images"
        if n_images < self.hparams.k + 1:
            raise TexadError(f"method.k={self.hparams.k} needs at least k+1={self.hparams.k + 1} {what}, "
                             f"but {where} has {n_images}")
        n_clusters = self.hparams.n_clusters or n_classes
        if n_clusters > n_images:
            raise TexadError(f"method.n_clusters={n_clusters} is larger than the number of {what} "
                             f"to cluster ({n_images} in {where})")
        return int(n_clusters)

    def _ensure_stored_maps(self, datamodule: Any) -> None:
        if self.hparams.maps_dir and self._stored_maps is None:
            datamodule.setup()
            self._stored_maps = load_stored_maps(self.hparams.maps_dir, datamodule.split.test, datamodule.image_size)

    def _maps_at_input(self, batch: Batch, features: torch.Tensor) -> torch.Tensor:
        """(B, H, W) anomaly maps at input resolution from the configured source."""
        size = batch.image.shape[-2:]
        if self.hparams.maps_dir:
            if self._stored_maps is None:
                raise TexadError("method.maps_dir: maps were not loaded (no datamodule to check them against)")
            return torch.stack([self._stored_maps[p] for p in batch.path]).to(batch.image.device)
        if self.hparams.maps_from == "gt":
            if batch.mask is None:
                raise TexadError("method.maps_from=gt needs ground-truth masks, but this data set has none")
            return batch.mask[:, 0].float()
        amap = self.model.fca(features[:, self.model.fca_channels])
        return F.interpolate(amap[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    def _image_data(self, batch: Batch) -> list[dict[str, torch.Tensor]]:
        """Per image: features (C,h,w) for clustered images, the map at feature (h,w) and input size."""
        if all(p in self._cache for p in batch.path):
            return [self._cache[p] for p in batch.path]
        features = self.model.features(batch.image)
        full = self._maps_at_input(batch, features).float()
        low = F.adaptive_avg_pool2d(full[:, None], features.shape[-2:])[:, 0]  # area average: masks → coverage
        items = []
        for i, path in enumerate(batch.path):
            item = {"map": low[i].cpu(), "full_map": full[i].cpu()}
            if self._clustered(int(batch.label[i])):
                item["features"] = features[i].cpu()
            self._cache[path] = item
            items.append(item)
        return items

    def _collect(self, datamodule: Any) -> tuple[list, torch.Tensor, torch.Tensor]:
        """Samples, features (N,C,h,w) and maps (N,h,w) of the clustered test images."""
        datamodule.setup()
        dataset = datamodule.test_dataset()
        indices = [i for i, s in enumerate(dataset.samples) if self._clustered(s.label)]
        types = {dataset.samples[i].defect_type for i in indices}
        self._n_clusters = self._check_sizes(len(indices), len(types), f"dataset {datamodule.name!r}")
        self._ensure_stored_maps(datamodule)
        loader = DataLoader(Subset(dataset, indices), batch_size=datamodule.eval_batch_size, shuffle=False,
                            num_workers=datamodule.num_workers, collate_fn=collate)
        items = []
        for batch in loader:
            with torch.no_grad():
                items.extend(self._image_data(_to(batch, self.device)))
        samples = [dataset.samples[i] for i in indices]
        return samples, torch.stack([it["features"] for it in items]), torch.stack([it["map"] for it in items])

    def _descriptors(self, features: torch.Tensor, maps: torch.Tensor, head: bool) -> torch.Tensor:
        weights = attention_weights(normalise_maps(maps), self.hparams.temperature)
        if head:
            features = self.model.head_features(features)
        smooth = smooth_and_center(features, self.hparams.feature_blur_kernel, self.hparams.feature_blur_sigma)
        return weighted_descriptors(smooth, weights)

    # --- fit: mine pairs, then train the head on anchor images --------------------------------
    def prepare_fit(self, cfg: Any, datamodule: Any) -> bool:
        samples, features, maps = self._collect(datamodule)
        raw = self._descriptors(features, maps, head=False)
        positives, negatives = mine_pairs(raw, self.hparams.k, self.hparams.negative_quantile)
        anomalous, normal = split_pixels(normalise_maps(maps), self.hparams.anomalous_level)
        types = [s.defect_type for s in samples]
        purity = float(np.mean([types[j] == types[i] for i in range(len(types)) for j in positives[i].tolist()]))
        self.fit_info = {"n_train_images": len(samples), "positive_purity": purity}
        log.info("clustering: %d images, positives of the same defect type: %.2f", len(samples), purity)
        self._train = {
            "features": features.flatten(2),  # (N, C, hw)
            "positives": positives,
            "negatives": negatives,
            "anomalous": _index_lists(anomalous.flatten(1)),
            "normal": _index_lists(normal.flatten(1)),
        }
        # The pipeline fits on datamodule.train_dataloader(); the head trains on anchor images of the
        # clustered set instead (see the report: a `fit_dataloader` hook in pipeline.py would do this).
        datamodule.train_dataloader = self.anchor_dataloader
        return self.hparams.epochs > 0

    def anchor_dataloader(self) -> DataLoader:
        n = self._train["features"].shape[0]
        return DataLoader(list(range(n)), batch_size=self.hparams.anchors_per_step,
                          sampler=EpochSeededShuffle(n, self.hparams.seed), collate_fn=torch.tensor)

    def _sample_pixels(self, images: torch.Tensor, kind: str, n: int, g: torch.Generator) -> torch.Tensor:
        """n feature vectors (n, C) of `kind` pixels, each from an image drawn uniformly from `images`."""
        padded, lengths = self._train[kind]
        img = images[torch.randint(len(images), (n,), generator=g)]
        pos = (torch.rand(n, generator=g) * lengths[img]).long()
        pix = padded[img, pos]
        return self._train["features"][img, :, pix]

    def training_step(self, anchors: torch.Tensor, batch_idx: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(self.hparams.seed) * 1_000_003 + int(self.global_step))
        hp, losses = self.hparams, []
        for a in anchors.cpu().tolist():
            anchor = torch.tensor([a])
            close = torch.cat([anchor, self._train["positives"][a]])
            pool = self._train["negatives"][a].nonzero()[:, 0]
            negatives = pool[torch.randperm(len(pool), generator=g)[: hp.n_negatives]]
            vectors = [
                self._sample_pixels(anchor, "anomalous", hp.anchor_pixels, g),
                self._sample_pixels(anchor, "normal", hp.anchor_pixels, g),
                self._sample_pixels(close, "anomalous", hp.pair_pixels, g),
                self._sample_pixels(close, "normal", hp.pair_pixels, g),
                self._sample_pixels(negatives, "anomalous", hp.pair_pixels, g),
            ]
            sizes = [len(v) for v in vectors]
            embedded = self.model.head(torch.cat(vectors).to(self.device)).split(sizes)
            loss, _ = contrastive_loss(*embedded, margin=hp.margin)
            losses.append(loss)
        loss = torch.stack(losses).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(anchors))
        self._loss_sum += float(loss.detach())
        self._loss_count += 1
        return loss

    def on_train_epoch_end(self) -> None:
        if self._loss_count:
            self.epoch_losses.append(self._loss_sum / self._loss_count)
        self._loss_sum = self._loss_count = 0.0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.head.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # --- evaluation ----------------------------------------------------------------------------
    def predict_maps(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The anomaly maps the descriptors attend to (FCA, masks or stored), at input resolution."""
        amap = torch.stack([it["full_map"] for it in self._image_data(batch)]).to(batch.image.device)
        return {"anomaly_map": amap, "pred_score": amap.flatten(1).amax(1)}

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Nothing to validate: clustering is judged on the test images only."""
        return None

    def on_test_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            self._ensure_stored_maps(datamodule)
        self._test_paths = []

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        out = super().test_step(batch, batch_idx)
        for path, label, defect_type in zip(batch.path, batch.label.tolist(), batch.defect_type):
            if self._clustered(int(label)):
                self._test_paths.append((path, defect_type, int(label)))
        return out

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if not self._test_paths:
            raise TexadError("no test images to cluster: the test set has no anomalous images")
        paths = [p for p, _, _ in self._test_paths]
        types = [t for _, t, _ in self._test_paths]
        classes = sorted(set(types))
        n_clusters = self._check_sizes(len(paths), len(classes), "the test set")
        features = torch.stack([self._cache[p]["features"] for p in paths]).to(self.device)
        maps = torch.stack([self._cache[p]["map"] for p in paths]).to(self.device)
        target = torch.tensor([classes.index(t) for t in types])
        descriptors, clusters, scores = {}, {}, {}
        for kind, head in (("raw", False), ("head", True)):
            descriptors[kind] = self._descriptors(features, maps, head=head).float().cpu()
            clusters[kind] = ward_clusters(descriptors[kind], n_clusters)
            metric = self.metrics["test_cluster" if head else "test_cluster_raw"]
            metric.update(torch.from_numpy(clusters[kind]), target)
            scores[kind] = metric.compute()
            metric.reset()
        res = self.results["test"]
        res.update(scores["head"])
        res.update({f"raw_{k}": v for k, v in scores["raw"].items()})
        res.update({"n_clustered": len(paths), "n_clusters": n_clusters, "maps_source": self.maps_source,
                    "include_good": bool(self.hparams.include_good), **self.fit_info})
        if self.epoch_losses:
            res.update({"head_loss_first_epoch": self.epoch_losses[0], "head_loss_last_epoch": self.epoch_losses[-1]})
        for key in ("nmi", "ari", "cluster_f1", "raw_nmi", "raw_ari", "raw_cluster_f1"):
            self.log(f"test/{key}", float(res[key]), rank_zero_only=True, sync_dist=False)
        output_dir = ((self.texad_config or {}).get("paths") or {}).get("output_dir")
        if output_dir and self.global_rank == 0:
            write_cluster_outputs(Path(output_dir), paths, types, clusters, descriptors, scores)


def _index_lists(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) bool → padded flat indices (N, max count) and counts (N,), for vectorised sampling."""
    lengths = masks.sum(1)
    padded = torch.zeros(masks.shape[0], max(int(lengths.max()), 1), dtype=torch.long)
    for i, row in enumerate(masks):
        idx = row.nonzero()[:, 0]
        padded[i, : len(idx)] = idx
    return padded, lengths.clamp(min=1)


def _to(batch: Batch, device: torch.device) -> Batch:
    batch.image = batch.image.to(device)
    if batch.mask is not None:
        batch.mask = batch.mask.to(device)
    return batch


def write_cluster_outputs(out_dir: Path, paths: list[str], types: list[str], clusters: dict[str, np.ndarray],
                          descriptors: dict[str, torch.Tensor], scores: dict[str, dict[str, float]]) -> None:
    """clusters.csv (one row per clustered image) and clusters.png (2-D PCA, before/after the head)."""
    from texad.writers import write_csv

    rows = [{"path": p, "defect_type": t, "cluster": int(c), "raw_cluster": int(r)}
            for p, t, c, r in zip(paths, types, clusters["head"], clusters["raw"])]
    write_csv(out_dir / "clusters.csv", rows, ["path", "defect_type", "cluster", "raw_cluster"])
    plot_projection(out_dir / "clusters.png", types, clusters, descriptors, scores)


def _pca_2d(x: torch.Tensor) -> np.ndarray:
    x = x.double() - x.double().mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return (x @ v[:2].T).numpy() if v.shape[0] >= 2 else np.c_[x @ v[:1].T, np.zeros(len(x))]


def plot_projection(path: Path, types: list[str], clusters: dict[str, np.ndarray],
                    descriptors: dict[str, torch.Tensor], scores: dict[str, dict[str, float]]) -> None:
    """Two PCA panels (descriptors without / with the head), colour = true defect type, marker = cluster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from texad.outputs import atomic_write

    classes = sorted(set(types))
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    markers = "o^sDvP*XhH<>p"
    fig, axes = plt.subplots(1, 2, figsize=(13, 6), dpi=110)
    for ax, (kind, title) in zip(axes, (("raw", "map-weighted backbone features (no head)"),
                                        ("head", "after the contrastive head"))):
        xy = _pca_2d(descriptors[kind])
        for ci, name in enumerate(classes):
            for cluster in np.unique(clusters[kind]):
                sel = np.array([t == name for t in types]) & (clusters[kind] == cluster)
                if sel.any():
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=55, color=colours(ci), marker=markers[cluster % len(markers)],
                               edgecolors="black", linewidths=0.4)
        s = scores[kind]
        ax.set_title(f"{title}\nNMI {s['nmi']:.2f}   ARI {s['ari']:.2f}   F1 {s['cluster_f1']:.2f}", fontsize=11)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours(ci), markeredgecolor="black", markersize=8,
                          label=name) for ci, name in enumerate(classes)]
    fig.legend(handles=handles, title="defect type (colour)", loc="center right", frameon=True)
    fig.suptitle(f"Anomaly clustering of {len(types)} images: colour = true defect type, marker shape = Ward cluster",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 0.86, 0.95))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
