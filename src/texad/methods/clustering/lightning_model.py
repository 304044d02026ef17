"""Anomaly clustering (Ardelean & Weyrich 2024) as a texad method: maps → descriptors → head → Ward.

The whole job runs inside the ordinary train/test flow:

* ``prepare_fit`` fits the localiser when the maps come from one (``map_sources``: the blind VAE on
  the clustered set, CFA on the normal training images; FCA needs no fit), then (``selection``) turns
  the validation normals into eight typed defect families and chooses there τ, layers, mining,
  negatives, epochs and the k rules (``validation_choice.py``; recorded under ``selection`` in metrics.json
  and kept in the checkpoint), then takes the *anomalous test
  images* (the clustered set; ``include_good`` adds the normal ones as one more class), computes
  their backbone features and anomaly maps (FCA, blind VAE, CFA, the ground-truth masks, or maps
  stored by an earlier run), builds the map-weighted descriptors, mines positive / negative images,
  and hands the trainer a loader of anchor images.
* the fit trains the head with the pixel-pair contrastive loss (``torch_model.contrastive_loss``).
* the test step reports the maps as this method's anomaly maps (pixel / image metrics as usual);
  ``on_test_epoch_end`` clusters the descriptors without and with the head (Ward) into the number
  of clusters in use (``n_clusters``: a number, ``oracle`` = the number of defect types, or null =
  estimated by the k rule chosen on validation, else ``k_criterion``; ``number.py``), adds ``nmi, ari, cluster_f1`` (with the head)
  and ``raw_nmi, raw_ari, raw_cluster_f1`` (without) to the test results, and the same with the
  true and with the estimated number under ``true_k_*`` / ``est_k_*``, and paired bootstrap intervals
  of head − raw under ``ci95``; writes ``clusters.csv``, ``clusters.png``, ``cluster_grid.png`` and
  ``dendrogram.png`` (``figures.py``; titles say how k was chosen) to the run dir. Images that carry
  one type label only (a folder of unsorted defects) are clustered and drawn, with no score.

Which images are clustered uses the test labels (the paper's evaluation setting: clustering
anomalous images into defect types), never the defect types (these only score the result, and
``n_clusters=oracle`` reads their number).

Hooks take what they need from the datamodule (its splits, loaders, batch size, mean/std), never
from the global config.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from texad.backbones import FeatureExtractor
from texad.data.batch import Batch, collate
from texad.errors import TexadError
from texad.methods.base import AnomalyModule
from texad.methods.clustering.checkpoint_state import frozen_key, settings_from_state, settings_state
from texad.methods.clustering.figures import write_cluster_outputs
from texad.methods.clustering.head_training import anchor_dataloader, mined_training_data
from texad.methods.clustering.map_sources import LOCALIZED, MAP_SOURCES, ClusteredImages, build_localizer, fit_localizer
from texad.methods.clustering.number import K_CRITERIA
from texad.methods.clustering.report import cluster_and_score, head_vs_raw_intervals, k_reason
from texad.methods.clustering.stored_maps import load_stored_maps
from texad.methods.clustering.thumbnails import thumbnail, thumbnail_map
from texad.methods.clustering.torch_model import (
    CENTERS,
    POOLINGS,
    ClusteringModel,
    anchor_generator,
    anchor_loss,
    clear_border,
    maps_on_cells,
)
from texad.methods.clustering.validation_choice import (
    HeadSetting,
    RawSetting,
    Validation,
    check_selection,
    choose_settings,
    setting_descriptors,
)
from texad.metrics.clustering import ClusteringMetrics

log = logging.getLogger(__name__)

class AnomalyClustering(AnomalyModule):
    """Clusters anomalous images by defect type with anomaly-map-attended descriptors and a
    contrastively trained head; see the module docstring for the flow and ``torch_model`` for the
    parts."""

    #: the head is judged by clustering the test images; validation metrics do not measure it
    selects_epochs = False

    def __init__(
        self,
        backbone: FeatureExtractor,
        name: str = "clustering",
        maps_from: str = "fca",
        maps_dir: str | None = None,
        n_clusters: int | str | None = None,
        k_criterion: str = "silhouette",
        k_min: int = 2,
        k_max: int = 10,
        include_good: bool = False,
        temperature: float = 0.02,
        attention_border: float = 0.08,
        pooling: str = "softmax",
        center: str = "image",
        standardize: bool = False,
        normalize_descriptors: bool = False,
        descriptor_layers: tuple[int, ...] | None = None,
        feature_pool: int = 1,
        normal_pixels: int = 4096,
        feature_blur_kernel: int = 7,
        feature_blur_sigma: float = 2.0,
        k: int = 3,
        mutual: bool = False,
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
        fca: Any = None,
        blind_vae: Any = None,
        cfa: Any = None,
        thumbnails_per_cluster: int = 6,
        selection: dict | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if maps_dir is None and maps_from not in MAP_SOURCES:
            raise TexadError(f"method.maps_from must be one of {list(MAP_SOURCES)} (or set method.maps_dir), got {maps_from!r}")
        for key, value, least in (("k", k, 1), ("n_negatives", n_negatives, 1), ("anchor_pixels", anchor_pixels, 1),
                                  ("pair_pixels", pair_pixels, 1), ("anchors_per_step", anchors_per_step, 1),
                                  ("epochs", epochs, 0), ("k_min", k_min, 2), ("normal_pixels", normal_pixels, 1)):
            if int(value) < least:
                raise TexadError(f"method.{key} must be at least {least}, got {value}")
        if int(k_max) < int(k_min):
            raise TexadError(f"method.k_max={k_max} must be at least method.k_min={k_min}")
        if isinstance(n_clusters, str) and n_clusters != "oracle":
            raise TexadError(f"method.n_clusters must be a number, 'oracle' (the number of defect types) or null "
                             f"(estimated by method.k_criterion), got {n_clusters!r}")
        if n_clusters is not None and not isinstance(n_clusters, str) and int(n_clusters) < 1:
            raise TexadError(f"method.n_clusters must be at least 1 (or null: estimated; 'oracle': the number of "
                             f"defect types), got {n_clusters}")
        if k_criterion not in K_CRITERIA:
            raise TexadError(f"method.k_criterion must be one of {list(K_CRITERIA)}, got {k_criterion!r}")
        if pooling not in POOLINGS:
            raise TexadError(f"method.pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if center not in CENTERS:
            raise TexadError(f"method.center must be one of {list(CENTERS)}, got {center!r}")
        if margin <= 0:
            raise TexadError(f"method.margin must be positive, got {margin}")
        self.save_hyperparameters(ignore=["backbone", "fca", "blind_vae", "cfa"])
        self.needs_normal = center == "normal" or bool(standardize)
        self.model = ClusteringModel(backbone, hidden_channels, out_channels,
                                     None if descriptor_layers is None else tuple(descriptor_layers), feature_pool,
                                     normal_pixels if self.needs_normal else 0)
        self.selection = check_selection(selection, epochs)
        layers = self.model.head_layers
        self.settings: dict[str, Any] = {
            "head": HeadSetting(float(temperature), layers, int(k), bool(mutual), int(n_negatives), int(epochs)),
            "raw": RawSetting(float(temperature), layers),
            "k_rule": {"head": {"criterion": k_criterion}, "raw": {"criterion": k_criterion}},
        }
        self.selection_record: dict[str, Any] = {"status": "off (method.selection.enabled=false)"}
        self.maps_source = "dir" if maps_dir else maps_from
        if self.maps_source in LOCALIZED:
            self.model.localizer = build_localizer(self.maps_source, backbone,
                                                   {"fca": fca, "blind_vae": blind_vae, "cfa": cfa})
        self.metrics["test_cluster"] = ClusteringMetrics()
        self.metrics["test_cluster_raw"] = ClusteringMetrics()
        self.epoch_losses: list[float] = []  # mean training loss per epoch (for tests and the record)
        self.fit_info: dict[str, Any] = {}
        self._cache: dict[str, dict[str, torch.Tensor]] = {}  # image path → features / maps / thumbnail
        self._stored_maps: dict[str, torch.Tensor] | None = None
        self._train: dict[str, Any] = {}
        self._loss_sum = self._loss_count = 0.0
        self._test_paths: list[tuple[str, str, int]] = []
        self._display: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # datamodule mean/std

    # --- which images, and their features and maps -------------------------------------------
    def _clustered(self, label: int) -> bool:
        return label == 1 or (self.hparams.include_good and label == 0)

    def _check_sizes(self, n_images: int, n_classes: int, where: str) -> int | None:
        """The fixed number of clusters (None when estimated), after checking k and n_clusters fit."""
        what = "test images" if self.hparams.include_good else "anomalous test images"
        k = self.settings["head"].k
        if n_images < k + 1:
            raise TexadError(f"method.k={k} needs at least k+1={k + 1} {what}, but {where} has {n_images}")
        wanted = self.hparams.n_clusters
        if wanted is None:
            if n_images < 3:
                raise TexadError(f"method.n_clusters=null estimates the number of clusters, which needs at least "
                                 f"3 {what}, but {where} has {n_images}")
            return None
        n_clusters = n_classes if wanted == "oracle" else int(wanted)
        if n_clusters > n_images:
            raise TexadError(f"method.n_clusters={n_clusters} is larger than the number of {what} "
                             f"to cluster ({n_images} in {where})")
        return int(n_clusters)

    def _ensure_stored_maps(self, datamodule: Any) -> None:
        if self.hparams.maps_dir and self._stored_maps is None:
            datamodule.setup()
            self._stored_maps = load_stored_maps(self.hparams.maps_dir, datamodule.split.test, datamodule.image_size)

    def _remember_display(self, datamodule: Any) -> None:
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if mean is not None and std is not None:
            self._display = (tuple(mean), tuple(std))

    def _maps_at_input(self, batch: Batch) -> torch.Tensor:
        """(B, H, W) anomaly maps at input resolution from the configured source."""
        if self.hparams.maps_dir:
            if self._stored_maps is None:
                raise TexadError("method.maps_dir: maps were not loaded (no datamodule to check them against)")
            return torch.stack([self._stored_maps[p] for p in batch.path]).to(batch.image.device)
        if self.hparams.maps_from == "gt":
            if batch.mask is None:
                raise TexadError("method.maps_from=gt needs ground-truth masks, but this data set has none")
            return batch.mask[:, 0].float()
        return self.model.localizer.predict_maps(batch)["anomaly_map"]

    def _image_data(self, batch: Batch) -> list[dict[str, torch.Tensor]]:
        """Per image: features (C,h,w) for clustered images, the map at feature (h,w) and input size."""
        if all(p in self._cache for p in batch.path):
            return [self._cache[p] for p in batch.path]
        features, grid = self.model.features(batch.image)
        full = self._maps_at_input(batch).float()
        low = maps_on_cells(full, grid, tuple(features.shape[-2:]))  # area average: masks → coverage
        items = []
        for i, path in enumerate(batch.path):
            item = {"map": low[i].cpu(), "full_map": full[i].cpu()}
            if self._clustered(int(batch.label[i])):
                item["features"] = features[i].cpu()
                item["thumbnail"] = thumbnail(batch.image[i], self._display)
                item["thumb_map"] = thumbnail_map(full[i])
            self._cache[path] = item
            items.append(item)
        return items

    def _clustered_loader(self, datamodule: Any) -> tuple[list, DataLoader]:
        datamodule.setup()
        dataset = datamodule.test_dataset()
        indices = [i for i, s in enumerate(dataset.samples) if self._clustered(s.label)]
        loader = DataLoader(Subset(dataset, indices), batch_size=datamodule.eval_batch_size, shuffle=False,
                            num_workers=datamodule.num_workers, collate_fn=collate)
        return [dataset.samples[i] for i in indices], loader

    def _clustered_images(self, datamodule: Any) -> ClusteredImages:
        """The clustered images as a training set, for a localiser fitted on them (map_sources)."""
        samples, loader = self._clustered_loader(datamodule)
        return ClusteredImages(samples, loader.dataset, datamodule.batch_size, datamodule.eval_batch_size,
                               int(self.hparams.seed))

    def _collect(self, datamodule: Any) -> tuple[list, torch.Tensor, torch.Tensor]:
        """Samples, features (N,C,h,w) and maps (N,h,w) of the clustered test images."""
        samples, loader = self._clustered_loader(datamodule)
        types = {s.defect_type for s in samples}
        self._check_sizes(len(samples), len(types), f"dataset {datamodule.name!r}")
        self._ensure_stored_maps(datamodule)
        items = []
        for batch in loader:
            with torch.no_grad():
                items.extend(self._image_data(_to(batch, self.device)))
        return samples, torch.stack([it["features"] for it in items]), torch.stack([it["map"] for it in items])

    @torch.no_grad()
    def _sample_normal_pixels(self, datamodule: Any) -> None:
        """Fill ``model.normal_pixels`` with a seeded sample of the normal training images' features."""
        datamodule.setup("fit")
        chunks = []
        for batch in datamodule.fit_statistics_dataloader():
            feats, _ = self.model.features(batch.image.to(self.device))
            chunks.append(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).cpu())
        pixels = torch.cat(chunks)
        g = torch.Generator().manual_seed(int(self.hparams.seed))
        n = self.model.normal_pixels.shape[0]
        pick = torch.randint(len(pixels), (n,), generator=g) if len(pixels) < n else torch.randperm(len(pixels), generator=g)[:n]
        self.model.normal_pixels.copy_(pixels[pick].to(self.model.normal_pixels))

    def _options(self) -> dict[str, Any]:
        hp = self.hparams
        return {"pooling": hp.pooling, "anomalous_level": hp.anomalous_level, "center": hp.center,
                "standardize": hp.standardize, "normalize": hp.normalize_descriptors,
                "blur_kernel": hp.feature_blur_kernel, "blur_sigma": hp.feature_blur_sigma}

    def _descriptors(self, features: torch.Tensor, maps: torch.Tensor, setting: RawSetting, head: bool) -> torch.Tensor:
        """Descriptors of all-layer features and (uncleared) maps at a setting's τ and layers, with or without the head."""
        return setting_descriptors(self.model, features, clear_border(maps, self.hparams.attention_border), setting,
                                   self._options(), self.model.head if head else None)

    # --- validation: typed synthetic defects choose the settings (validation_choice.py) ---------------------
    @torch.no_grad()
    def _validation_set(self, datamodule: Any) -> tuple[Validation, str]:
        """Features and maps of the typed validation images, and where their maps come from."""
        sel = self.selection
        dataset = datamodule.typed_validation_dataset(sel["families"], sel["per_family"])
        loader = DataLoader(dataset, batch_size=datamodule.eval_batch_size, shuffle=False,
                            num_workers=datamodule.num_workers, collate_fn=collate)
        # stored maps exist for the test images only: validation then attends to its masks
        source = "gt" if self.hparams.maps_dir else self.maps_source
        features, maps, types = [], [], []
        for batch in loader:
            batch = _to(batch, self.device)
            feats, grid = self.model.features(batch.image)
            full = (batch.mask[:, 0].float() if source == "gt"
                    else self.model.localizer.predict_maps(batch)["anomaly_map"].float())
            features.append(feats.cpu())
            maps.append(maps_on_cells(full, grid, tuple(feats.shape[-2:])).cpu())
            types.extend(batch.defect_type)
        maps_low = clear_border(torch.cat(maps), self.hparams.attention_border)
        return Validation(torch.cat(features), maps_low, types), source

    def _select_on_validation(self, datamodule: Any) -> None:
        """Choose τ, layers, mining, negatives, epochs and the k rules on typed validation defects."""
        sel, hp = self.selection, self.hparams
        datamodule.setup()
        if not datamodule.val_samples:
            self.selection_record = {"status": f"off: dataset {datamodule.name!r} has no validation normals; "
                                               "the configured settings are used"}
            log.warning("clustering: %s", self.selection_record["status"])
            return
        val, source = self._validation_set(datamodule)
        training = {key: hp[key] for key in ("negative_quantile", "anomalous_level", "anchor_pixels", "pair_pixels",
                                             "margin", "lr", "weight_decay")}
        configured = {"head": self.settings["head"], "raw": self.settings["raw"]}
        self.settings, self.selection_record = choose_settings(
            self.model, val, source, configured, sel, self._options(), training, hp.k_criterion, hp.k_min, hp.k_max,
            int(hp.seed))
        torch.manual_seed(int(hp.seed))
        self.model.set_head_layers(self.settings["head"].layers)  # a fresh head for the fit, reading the chosen layers

    # --- fit: the localiser, then mine pairs and train the head on anchor images -----------------
    def prepare_fit(self, datamodule: Any) -> bool:
        self._remember_display(datamodule)
        if self.maps_source in LOCALIZED:
            info = fit_localizer(self.maps_source, self.model.localizer, datamodule, self._clustered_images(datamodule))
            self.fit_info.update(info)
        if self.needs_normal:
            self._sample_normal_pixels(datamodule)
        if self.selection["enabled"]:
            self._select_on_validation(datamodule)
        head = self.settings["head"]
        samples, features, maps = self._collect(datamodule)
        raw = self._descriptors(features, maps, head.raw(), head=False)
        self._train, info = mined_training_data(
            features[:, self.model.channels(head.layers)], clear_border(maps, self.hparams.attention_border), raw,
            [s.defect_type for s in samples], head.k, self.hparams.negative_quantile, head.mutual,
            self.hparams.anomalous_level)
        self.fit_info.update(info)
        # The pipeline fits on datamodule.train_dataloader(); the head trains on anchor images of the
        # clustered set instead (see the report: a `fit_dataloader` hook in pipeline.py would do this).
        datamodule.train_dataloader = self.anchor_dataloader
        return head.epochs > 0

    def anchor_dataloader(self) -> DataLoader:
        return anchor_dataloader(self._train["features"].shape[0], self.hparams.anchors_per_step, self.hparams.seed)

    def training_step(self, anchors: torch.Tensor, batch_idx: int) -> torch.Tensor:
        g = anchor_generator(int(self.hparams.seed), int(self.global_step))
        hp = self.hparams
        n_negatives = self.settings["head"].n_negatives
        losses = [anchor_loss(self.model.head, self._train, a, g, n_negatives, hp.anchor_pixels, hp.pair_pixels,
                              hp.margin, self.device) for a in anchors.cpu().tolist()]
        loss = torch.stack(losses).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(anchors))
        self._loss_sum += float(loss.detach())
        self._loss_count += 1
        return loss

    def on_train_epoch_end(self) -> None:
        if self._loss_count:
            self.epoch_losses.append(self._loss_sum / self._loss_count)
        self._loss_sum = self._loss_count = 0.0
        if self.current_epoch + 1 >= self.settings["head"].epochs:  # validation chose fewer than method.epochs
            self.trainer.should_stop = True

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.head.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # --- checkpoints: the localiser's frozen backbone copies stay out, like the main backbone ------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not frozen_key(k)}

    def get_extra_state(self) -> dict[str, Any]:
        """The settings in use (validation may have chosen them) and the selection record travel in the checkpoint."""
        return settings_state(self.settings, self.selection_record)

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.settings, record = settings_from_state(state)
        self.selection_record = record if record is not None else self.selection_record
        if tuple(self.settings["head"].layers) != self.model.head_layers:
            self.model.set_head_layers(self.settings["head"].layers)

    def load_method_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        if "_extra_state" in state_dict:  # before the weights: the head's input width follows the saved layers
            self.set_extra_state(state_dict["_extra_state"])
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not frozen_key(k) and ".metrics." not in f".{k}"]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")

    # --- evaluation ----------------------------------------------------------------------------
    def predict_maps(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The anomaly maps the descriptors attend to (localiser, masks or stored), at input resolution."""
        amap = torch.stack([it["full_map"] for it in self._image_data(batch)]).to(batch.image.device)
        return {"anomaly_map": amap, "pred_score": amap.flatten(1).amax(1)}

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Nothing to validate: clustering is judged on the test images only."""
        return None

    def on_test_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            self._ensure_stored_maps(datamodule)
            self._remember_display(datamodule)
            if self.needs_normal and not bool(self.model.normal_pixels.abs().sum() > 0):
                self._sample_normal_pixels(datamodule)
        self._test_paths = []

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        out = super().test_step(batch, batch_idx)
        for path, label, defect_type in zip(batch.path, batch.label.tolist(), batch.defect_type):
            if self._clustered(int(label)):
                self._test_paths.append((path, defect_type, int(label)))
        return out

    def _score(self, kind: str, clusters: np.ndarray, target: torch.Tensor) -> dict[str, float]:
        metric = self.metrics["test_cluster" if kind == "head" else "test_cluster_raw"]
        metric.update(torch.from_numpy(clusters), target)
        scores = metric.compute()
        metric.reset()
        return scores

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if not self._test_paths:
            raise TexadError("no test images to cluster: the test set has no anomalous images")
        hp = self.hparams
        paths = [p for p, _, _ in self._test_paths]
        types = [t for _, t, _ in self._test_paths]
        classes = sorted(set(types))
        # a folder without type labels (one type) is still clustered and drawn; it has nothing to score against
        labelled = len(classes) >= 2
        fixed = self._check_sizes(len(paths), len(classes), "the test set")
        features = torch.stack([self._cache[p]["features"] for p in paths]).to(self.device)
        maps = torch.stack([self._cache[p]["map"] for p in paths]).to(self.device)
        target = torch.tensor([classes.index(t) for t in types])
        settings = {"raw": self.settings["raw"], "head": self.settings["head"].raw()}
        with torch.no_grad():
            descriptors = {kind: self._descriptors(features, maps, settings[kind], head=kind == "head").float().cpu()
                           for kind in ("raw", "head")}
        on_validation = self.selection_record.get("status") == "chosen on validation"
        reasons = {kind: k_reason(kind, fixed, hp.n_clusters, self.settings["k_rule"][kind], on_validation)
                   for kind in ("raw", "head")}
        report = cluster_and_score(descriptors, classes, target, labelled, fixed, self.settings["k_rule"], reasons,
                                   hp.k_min, hp.k_max, self._score)
        res = self.results["test"]
        res.update(report.record)
        res.update({"n_clustered": len(paths), "n_types": len(classes) if labelled else None,
                    "k_criterion": self.settings["k_rule"]["head"]["criterion"], "k_estimates": report.estimates,
                    "maps_source": self.maps_source, "include_good": bool(hp.include_good),
                    "clustering_settings": {"head": asdict(self.settings["head"]), "raw": asdict(self.settings["raw"])},
                    "selection": self.selection_record, **self.fit_info})
        if labelled:
            res.setdefault("ci95", {}).update(head_vs_raw_intervals(report.clusters, report.true_k, target))
        if self.epoch_losses:
            res.update({"head_loss_first_epoch": self.epoch_losses[0], "head_loss_last_epoch": self.epoch_losses[-1]})
        if labelled:
            for key in ("nmi", "ari", "cluster_f1", "raw_nmi", "raw_ari", "raw_cluster_f1"):
                self.log(f"test/{key}", float(res[key]), rank_zero_only=True, sync_dist=False)
        else:
            log.info("clustering: the clustered images carry one type label (%s), so there is nothing to score; "
                     "clusters.csv and the figures are written", classes[0])
        output_dir = self.output_dir
        if output_dir is not None and self.global_rank == 0:
            write_cluster_outputs(Path(output_dir), paths, types, report.clusters, descriptors, report.scores,
                                  report.linkages, report.used_k, [self._cache[p]["thumbnail"] for p in paths],
                                  [self._cache[p]["thumb_map"] for p in paths], hp.thumbnails_per_cluster,
                                  report.reasons, report.true_k)


def _to(batch: Batch, device: torch.device) -> Batch:
    batch.image = batch.image.to(device)
    if batch.mask is not None:
        batch.mask = batch.mask.to(device)
    return batch


