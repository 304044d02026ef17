"""Anomaly clustering (Ardelean & Weyrich 2024) as a texad method: maps → descriptors → head → Ward.

The whole job runs inside the ordinary train/test flow:

* ``prepare_fit`` fits the localiser when the maps come from one (``map_sources``: the blind VAE on
  the clustered set, CFA on the normal training images; FCA needs no fit), then (``selection``) turns
  the validation normals into eight typed defect families and chooses there τ, layers, mining,
  negatives, epochs and the k rules (``selection.py``; recorded under ``selection`` in metrics.json
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
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from texad.backbones import FeatureExtractor
from texad.data.batch import Batch, collate
from texad.data.datamodule import EpochSeededShuffle
from texad.errors import TexadError
from texad.methods.base import AnomalyModule
from texad.methods.clustering.figures import write_cluster_outputs
from texad.methods.clustering.map_sources import LOCALIZED, MAP_SOURCES, ClusteredImages, build_localizer, fit_localizer
from texad.methods.clustering.number import K_CRITERIA, cut_tree, ward_linkage
from texad.methods.clustering.selection import (
    HeadSetting,
    RawSetting,
    Validation,
    check_criteria,
    choose_head,
    choose_k_rule,
    choose_raw,
    estimate_with_rule,
    setting_descriptors,
)
from texad.methods.clustering.torch_model import (
    CENTERS,
    POOLINGS,
    ClusteringModel,
    anchor_generator,
    anchor_loss,
    clear_border,
    maps_on_cells,
    mine_pairs,
    pair_training_data,
)
from texad.data.type_families import TYPE_FAMILIES
from texad.metrics.clustering import ClusteringMetrics, paired_clustering_differences
from texad.outputs import read_npz_array
from texad.artifacts import sample_name

log = logging.getLogger(__name__)

THUMB = 96  # side of the thumbnails kept per clustered image for the cluster grid


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
        self.selection = _check_selection(selection, epochs)
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

    def _thumbnail(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, THUMB, THUMB) of a normalised input image, for the cluster grid."""
        small = F.interpolate(image[None].float(), size=(THUMB, THUMB), mode="bilinear", align_corners=False)[0]
        if self._display is not None:
            mean = torch.tensor(self._display[0], device=small.device).view(-1, 1, 1)
            std = torch.tensor(self._display[1], device=small.device).view(-1, 1, 1)
            small = small * std + mean
        else:
            small = (small - small.min()) / (small.max() - small.min()).clamp(min=1e-8)
        return (small.clamp(0, 1) * 255).round().to(torch.uint8).cpu()

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
                item["thumbnail"] = self._thumbnail(batch.image[i])
                item["thumb_map"] = F.interpolate(full[i][None, None], size=(THUMB, THUMB), mode="bilinear",
                                                  align_corners=False)[0, 0].cpu()
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

    # --- validation: typed synthetic defects choose the settings (selection.py) ---------------------
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
        options = self._options()
        training = {key: hp[key] for key in ("negative_quantile", "anomalous_level", "anchor_pixels", "pair_pixels",
                                             "margin", "lr", "weight_decay")}
        seed = int(hp.seed)
        configured = {"head": self.settings["head"], "raw": self.settings["raw"]}
        raw, raw_table = choose_raw(self.model, val, configured["raw"], sel["temperature"], sel["layers"], options)
        head, head_table, head_desc = choose_head(self.model, val, configured["head"], sel, options, training, seed)
        raw_desc = setting_descriptors(self.model, val.features, val.maps, raw, options)
        rules, rule_errors = {}, {}
        for kind, desc in (("raw", raw_desc), ("head", head_desc)):
            rules[kind], rule_errors[kind] = choose_k_rule(desc, val.types, sel["k_criteria"], hp.k_criterion,
                                                           hp.k_min, hp.k_max, sel["k_subsets"], seed)
        self.settings = {"head": head, "raw": raw, "k_rule": rules}
        torch.manual_seed(seed)
        self.model.set_head_layers(head.layers)  # a fresh head for the fit, reading the chosen layers
        best = {kind: max(r["nmi"] for r in table if _same(r, chosen))
                for kind, table, chosen in (("raw", raw_table, raw), ("head", head_table, head))}
        self.selection_record = {
            "status": "chosen on validation",
            "families": sorted(set(val.types)), "images": len(val.types), "maps": source,
            "chosen": {"head": asdict(head), "raw": asdict(raw), "k_rule": rules},
            "val_nmi": {"head": best["head"], "raw": best["raw"],
                        "raw_configured": raw_table[0]["nmi"]},
            # not a switch: both are always reported; this says which one validation would trust
            "validation_prefers": "head" if best["head"] > best["raw"] else "raw",
            "k_rule_errors": rule_errors,
            "candidates": {"raw": raw_table, "head": head_table},
        }
        log.info("clustering: chosen on %d validation images (%d families, %s maps): head %s (NMI %.3f), "
                 "raw %s (NMI %.3f), k rules %s", len(val.types), val.n_types, source, head, best["head"], raw,
                 best["raw"], rules)

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
        positives, negatives = mine_pairs(raw, head.k, self.hparams.negative_quantile, head.mutual)
        types = [s.defect_type for s in samples]
        # recorded only: how often a mined positive shares the anchor's defect type (never used to choose)
        pairs = [(i, j) for i in range(len(types)) for j in positives[i].tolist()]
        purity = float(np.mean([types[i] == types[j] for i, j in pairs]))
        self.fit_info.update({"n_train_images": len(samples), "positive_purity": purity,
                              "positives_per_image": len(pairs) / len(samples)})
        log.info("clustering: %d images, positives of the same defect type: %.2f", len(samples), purity)
        self._train = pair_training_data(features[:, self.model.channels(head.layers)],
                                         clear_border(maps, self.hparams.attention_border), positives,
                                         negatives, self.hparams.anomalous_level)
        # The pipeline fits on datamodule.train_dataloader(); the head trains on anchor images of the
        # clustered set instead (see the report: a `fit_dataloader` hook in pipeline.py would do this).
        datamodule.train_dataloader = self.anchor_dataloader
        return head.epochs > 0

    def anchor_dataloader(self) -> DataLoader:
        n = self._train["features"].shape[0]
        return DataLoader(list(range(n)), batch_size=self.hparams.anchors_per_step,
                          sampler=EpochSeededShuffle(n, self.hparams.seed), collate_fn=torch.tensor)

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
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not _frozen_key(k)}

    def get_extra_state(self) -> dict[str, Any]:
        """The settings in use (validation may have chosen them) and the selection record travel in the checkpoint."""
        return {"settings": {"head": asdict(self.settings["head"]), "raw": asdict(self.settings["raw"]),
                             "k_rule": dict(self.settings["k_rule"])},
                "selection": self.selection_record}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = state["settings"]
        head = HeadSetting(**{**saved["head"], "layers": tuple(saved["head"]["layers"])})
        self.settings = {"head": head, "raw": RawSetting(saved["raw"]["temperature"], tuple(saved["raw"]["layers"])),
                         "k_rule": dict(saved["k_rule"])}
        self.selection_record = state.get("selection", self.selection_record)
        if tuple(head.layers) != self.model.head_layers:
            self.model.set_head_layers(head.layers)

    def load_method_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        if "_extra_state" in state_dict:  # before the weights: the head's input width follows the saved layers
            self.set_extra_state(state_dict["_extra_state"])
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not _frozen_key(k) and ".metrics." not in f".{k}"]
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

    def _k_reason(self, kind: str, fixed: int | None) -> str:
        """How the number of clusters of `kind` was chosen, in words (figures, metrics.json)."""
        wanted = self.hparams.n_clusters
        if wanted == "oracle":
            return "oracle: the number of defect types"
        if fixed is not None:
            return f"fixed: method.n_clusters={wanted}"
        rule = self.settings["k_rule"][kind]
        name = (f"a Ward cut at {rule['factor']:.2f} x the median nearest-neighbour distance"
                if rule["criterion"] == "height" else rule["criterion"])
        if self.selection_record.get("status") == "chosen on validation":
            return f"estimated by {name}, the k rule chosen on validation"
        return f"estimated by {name} (method.k_criterion)"

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
        res = self.results["test"]
        descriptors, linkages, clusters, used_k, scores, reasons = {}, {}, {}, {}, {}, {}
        estimates: dict[str, dict[str, int]] = {}
        for kind in ("raw", "head"):
            prefix = "" if kind == "head" else "raw_"
            with torch.no_grad():
                setting = self.settings["raw"] if kind == "raw" else self.settings["head"].raw()
                descriptors[kind] = self._descriptors(features, maps, setting, head=kind == "head").float().cpu()
            linkages[kind] = ward_linkage(descriptors[kind])
            k_est = None
            if len(paths) >= 3:
                rule = self.settings["k_rule"][kind]
                # every criterion's estimate is recorded; the rule in use is one of them or the fitted height
                for criterion in (*K_CRITERIA, *(["height"] if rule["criterion"] == "height" else [])):
                    estimates.setdefault(criterion, {})[kind] = estimate_with_rule(
                        descriptors[kind], rule if criterion == "height" else {"criterion": criterion},
                        hp.k_min, hp.k_max, linkages[kind])
                k_est = estimates[rule["criterion"]][kind]
            used_k[kind] = fixed if fixed is not None else k_est
            reasons[kind] = self._k_reason(kind, fixed)
            clusters[kind] = cut_tree(linkages[kind], used_k[kind])
            res[f"{prefix}n_clusters"] = used_k[kind]
            res[f"{prefix}k_estimated"] = k_est
            res[f"{prefix}k_rule"] = self.settings["k_rule"][kind]
            res[f"{prefix}k_how"] = reasons[kind]
            if not labelled:
                scores[kind] = None
                continue
            scores[kind] = self._score(kind, clusters[kind], target)
            res.update({f"{prefix}{key}": v for key, v in scores[kind].items()})
            for tag, k_value in (("true_k", len(classes)), ("est_k", k_est)):
                if k_value is None or k_value > len(paths):
                    continue
                other = self._score(kind, cut_tree(linkages[kind], k_value), target)
                res.update({f"{tag}_{prefix}{key}": v for key, v in other.items()})
        res.update({"n_clustered": len(paths), "n_types": len(classes) if labelled else None,
                    "k_criterion": self.settings["k_rule"]["head"]["criterion"], "k_estimates": estimates,
                    "maps_source": self.maps_source, "include_good": bool(hp.include_good),
                    "clustering_settings": {"head": asdict(self.settings["head"]), "raw": asdict(self.settings["raw"])},
                    "selection": self.selection_record, **self.fit_info})
        true_k = {f"{prefix}cluster_true_k": cut_tree(linkages[kind], len(classes))
                  for kind, prefix in (("head", ""), ("raw", "raw_"))} if labelled else {}
        if labelled:
            res.setdefault("ci95", {}).update(self._head_vs_raw_intervals(clusters, true_k, target))
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
            write_cluster_outputs(Path(output_dir), paths, types, clusters, descriptors, scores, linkages, used_k,
                                  [self._cache[p]["thumbnail"] for p in paths],
                                  [self._cache[p]["thumb_map"] for p in paths], hp.thumbnails_per_cluster, reasons,
                                  true_k)

    @staticmethod
    def _head_vs_raw_intervals(clusters: dict[str, np.ndarray], true_k: dict[str, np.ndarray],
                               target: torch.Tensor) -> dict[str, Any]:
        """Paired bootstrap (types kept, 1000 replicates, seed 0) of head − raw, at the k in use and at the true k."""
        out = {}
        for tag, head, raw in (("", clusters["head"], clusters["raw"]),
                               ("true_k_", true_k["cluster_true_k"], true_k["raw_cluster_true_k"])):
            diffs = paired_clustering_differences([head], [raw], target.numpy())
            out.update({f"{tag}head_minus_raw_{name}": d for name, d in diffs.items()})
        return out


SELECTION_DEFAULTS: dict[str, Any] = {
    "enabled": False, "families": list(TYPE_FAMILIES), "per_family": 8, "temperature": [], "layers": [],
    "mining": [], "n_negatives": [], "epochs": [], "k_criteria": list(K_CRITERIA), "k_subsets": 3,
}


def _check_selection(selection: dict | None, epochs: int) -> dict[str, Any]:
    """method.selection with defaults filled in, checked (unknown keys, empty or out-of-range values)."""
    given = dict(selection or {})
    unknown = sorted(set(given) - set(SELECTION_DEFAULTS))
    if unknown:
        raise TexadError(f"method.selection: unknown keys {unknown}; expected some of {sorted(SELECTION_DEFAULTS)}")
    sel = {**SELECTION_DEFAULTS, **given}
    sel["enabled"] = bool(sel["enabled"])
    sel["families"] = [str(f) for f in sel["families"]]
    bad = [f for f in sel["families"] if f not in TYPE_FAMILIES]
    if bad or len(sel["families"]) < 3:
        raise TexadError(f"method.selection.families={sel['families']}: at least 3 of {list(TYPE_FAMILIES)}")
    if int(sel["per_family"]) < 2:
        raise TexadError(f"method.selection.per_family must be at least 2, got {sel['per_family']}")
    sel["per_family"] = int(sel["per_family"])
    sel["temperature"] = [float(t) for t in sel["temperature"]]
    if any(t <= 0 for t in sel["temperature"]):
        raise TexadError(f"method.selection.temperature: every τ must be positive, got {sel['temperature']}")
    sel["layers"] = [tuple(int(i) for i in ls) for ls in sel["layers"]]
    sel["mining"] = [dict(m) for m in sel["mining"]]
    for m in sel["mining"]:
        if "k" not in m or int(m["k"]) < 1 or set(m) - {"k", "mutual"}:
            raise TexadError(f"method.selection.mining: each entry is {{k: >=1, mutual: bool}}, got {m}")
    sel["n_negatives"] = [int(n) for n in sel["n_negatives"]]
    if any(n < 1 for n in sel["n_negatives"]):
        raise TexadError(f"method.selection.n_negatives must all be at least 1, got {sel['n_negatives']}")
    sel["epochs"] = sorted({int(e) for e in sel["epochs"]})
    if sel["enabled"] and any(e < 1 or e > int(epochs) for e in sel["epochs"]):
        raise TexadError(f"method.selection.epochs={sel['epochs']} must lie in 1..method.epochs={epochs} "
                         "(the trainer runs at most method.epochs)")
    sel["k_criteria"] = check_criteria([str(c) for c in sel["k_criteria"]])
    sel["k_subsets"] = int(sel["k_subsets"])
    if sel["k_subsets"] < 1:
        raise TexadError(f"method.selection.k_subsets must be at least 1, got {sel['k_subsets']}")
    return sel


def _same(row: dict[str, Any], setting: Any) -> bool:
    """A candidate-table row describes this setting."""
    return all(row[key] == value for key, value in asdict(setting).items())


def _frozen_key(key: str) -> bool:
    """State keys of frozen backbone weights (the main one and the localiser's copies/views)."""
    return ".backbone." in f".{key}"


def _to(batch: Batch, device: torch.device) -> Batch:
    batch.image = batch.image.to(device)
    if batch.mask is not None:
        batch.mask = batch.mask.to(device)
    return batch


