"""CFA / Sp-CFA as a LightningModule around `CFAModel`, with the cache of trained views.

With `view_cache` on, every view (original image, or superpixels at one region size) is looked up
in `texad.methods.cfa.view_cache` before fitting: cached views are loaded and frozen (no bank, no loss, no
gradient), only the others train, and `finish_fit` stores them. Their per-split score maps are
reused at evaluation too, so an α sweep trains and scores each view once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from texad.backbones import FeatureExtractor
from texad.data.batch import Batch
from texad.data.superpixel_views import DEFAULT_SLIC, SuperpixelViews
from texad.errors import TexadError
from texad.methods.base import AnomalyModule
from texad.methods.cfa.feature_cache import FrozenFeatureCache, feature_key
from texad.methods.cfa.torch_model import CFAModel
from texad.methods.cfa.view_cache import ViewCache, state_digest, view_description
from texad.methods.components.image_score import image_score as image_score_of
from texad.outputs import digest, write_json

log = logging.getLogger(__name__)


def _check_alpha(alpha: Sequence[float], region_sizes: Sequence[int | None]) -> None:
    if len(alpha) != 3:
        raise TexadError(f"method.alpha must have 3 weights [α_org, α_small, α_big], got {list(alpha)}")
    if len(region_sizes) != 2:
        raise TexadError(f"method.region_sizes must be [rs_small, rs_big] (null = view off), got {list(region_sizes)}")
    for a, rs, name in zip(alpha[1:], region_sizes, ("small", "big")):
        if rs is None and float(a) != 0.0:
            raise TexadError(f"method.alpha gives weight {a} to the {name} view, but its region size is null (off)")


class CFA(AnomalyModule):
    """Coupled-hypersphere feature adaptation (Lee et al. 2022); Sp-CFA when region sizes are set.

    The memory banks are built once at fit start from the normal training images (reduced across
    DDP ranks) and saved in the checkpoint; a resumed fit reuses them.
    """

    def __init__(
        self,
        backbone: FeatureExtractor,
        name: str = "cfa",
        epochs: int = 30,
        k: int = 3,
        j: int = 3,
        r0: float = 1e-5,
        loss_margin: float = 0.1,
        nu: float = 1e-3,
        gamma_c: int = 1,
        gamma_d: int = 1,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        amsgrad: bool = True,
        pool: int = 3,
        blur_sigma: float = 4.0,
        region_sizes: Sequence[int | None] = (None, None),
        alpha: Sequence[float] = (1.0, 0.0, 0.0),
        loss_weights: Sequence[float] = (1.0, 1.0, 1.0),
        distance_budget_mb: float = 256.0,
        seed: int = 0,
        image_rule: str = "auto",  # issue 32: image-score rule (texad.methods.image_rule)
        slic: dict | None = None,
        view_cache: bool = False,
        score: str = "softmin",
        input_padding: int = 0,
        input_padding_mode: str = "reflect",
        image_score: str = "max",
        image_score_fraction: float = 0.01,
        calibration: str = "none",
    ) -> None:
        super().__init__()
        region_sizes = [None if r is None else int(r) for r in region_sizes]
        _check_alpha(alpha, region_sizes)
        self.save_hyperparameters(ignore=["backbone"])
        self.model = CFAModel(
            backbone,
            region_sizes=region_sizes,
            alpha=alpha,
            loss_weights=loss_weights,
            k=k,
            j=j,
            r0=r0,
            loss_margin=loss_margin,
            nu=nu,
            gamma_d=gamma_d,
            pool=pool,
            blur_sigma=blur_sigma,
            distance_budget_mb=distance_budget_mb,
            init_seed=seed,
            score=score,
            input_padding=input_padding,
            input_padding_mode=input_padding_mode,
            calibration=calibration,
        )
        image_score_of(torch.zeros(1, 4), image_score, image_score_fraction)  # check the keys now, not at test
        self.view_keys: dict[str, str] = {}  # view name → cache key (set by attach_views)
        self.frozen_views: set[str] = set()  # loaded from the cache: not trained in this fit
        self.fit_info: dict[str, Any] = {}  # {"view_cache": {...}}: for metrics.json
        self.view_outputs: dict[str, dict[str, Any]] = {}  # split → per-view maps, masks, labels
        self._cache = None
        self._cache_root: Path | None = None  # set by attach_views
        self._backbone_description: dict[str, Any] = {}
        self._run_dir: Path | None = None
        self._split: str | None = None
        self._cached_maps: dict[str, dict[str, torch.Tensor]] = {}
        self._split_map_keys: dict[str, str] = {}
        self._computed_maps: dict[str, dict[str, torch.Tensor]] = {}

    # --- superpixel views requested from the datamodule -----------------------------------------
    @property
    def view_region_sizes(self) -> list[int]:
        return [self.model.region_sizes[v] for v in self.model.view_names[1:]]

    def attach_views(
        self, datamodule: Any, *, cache_dir: str | Path, output_dir: str | Path | None, run_description: dict[str, Any]
    ) -> None:
        """Give the datamodule a picklable SLIC + mosaic builder; compute the views' cache keys.

        `cache_dir` holds superpixels, trained views and frozen features; `output_dir` (the run dir)
        gets view_cache.json; `run_description` (`texad.methods.cfa.view_cache.run_description`) is what of the
        run decides a trained view, for the cache keys.
        """
        self._cache_root = Path(str(cache_dir))
        self._backbone_description = dict(run_description.get("backbone") or {})
        slic = {**DEFAULT_SLIC, **(self.hparams.slic or {})}
        if self.view_region_sizes:
            datamodule.views = SuperpixelViews(self.view_region_sizes, self._cache_root / "superpixels", slic)
        for v in self.model.view_names:
            rs = self.model.region_sizes.get(v)
            view = {"kind": "original"} if v == "org" else {"kind": "superpixel", "region_size": rs, "slic": slic}
            self.view_keys[v] = digest(view_description(run_description, view, self.model.loss_weights[v]))
        if self.hparams.view_cache:
            self._cache = ViewCache(self._cache_root / "views")
        self._run_dir = Path(str(output_dir)) if output_dir else None

    def _feats(self, batch: Batch, views: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        wanted = self.model.view_names if views is None else [v for v in self.model.view_names if v in views]
        mosaics = {}
        if any(v != "org" for v in wanted):
            levels = batch.extra.get("mosaics")
            if levels is None:
                raise TexadError("Sp-CFA needs superpixel mosaics in the batch; the datamodule did not provide them")
            mosaics = {v: levels[:, i] for i, v in enumerate(self.model.view_names[1:])}
        return self.model.view_features(batch.image, mosaics, wanted)

    # --- the cache of trained views ------------------------------------------------------------
    def prepare_fit(self, datamodule: Any) -> bool:
        """Load cached views and freeze them; fit only when some view is not cached."""
        self.frozen_views = set()
        self._setup_feature_cache(datamodule)
        if self._cache is None:
            return True
        heads = {}
        for v in self.model.view_names:
            state = self._cache.load_head(self.view_keys[v])
            if state is None:
                heads[v] = "trained"
                continue
            self.model.heads[v].load_state_dict(state)
            self.model.heads[v].requires_grad_(False)
            self.frozen_views.add(v)
            heads[v] = "hit"
        self._record("heads", heads)
        log.info("view cache: %s", ", ".join(f"{v} {h} ({self.view_keys[v][:10]})" for v, h in heads.items()))
        return len(self.frozen_views) < len(self.model.view_names)

    def _setup_feature_cache(self, datamodule: Any) -> None:
        """With dataset.cache_features, memoise frozen training features (in memory and on disk)."""
        self._feature_cache = None
        if not getattr(datamodule, "cache_features", False):
            return
        if self._cache_root is None:
            raise TexadError("dataset.cache_features=true needs the run's cache dir: call "
                             "attach_views(datamodule, cache_dir=..., output_dir=..., run_description=...) first "
                             "(texad.pipeline.build does)")

        datamodule.setup("fit")
        description = {
            "train": [str(s.path) for s in datamodule.train_samples],
            "image_size": datamodule.image_size,
            "mean": datamodule.mean,
            "std": datamodule.std,
            "backbone": self._backbone_description,
            "pool": self.hparams.pool,
            "features_version": 2,  # bump when CFAModel.features changes (2: pooled before the padding crop)
            "input_padding": [self.hparams.input_padding, self.hparams.input_padding_mode],
            "views": {v: self.model.region_sizes.get(v) for v in self.model.view_names},
            "slic": dict(self.hparams.slic or {}),
        }
        path = self._cache_root / "features" / f"{feature_key(description)}.pt"
        self._feature_cache = FrozenFeatureCache(len(datamodule.train_samples), path)

    def _fit_validation_feats(self, batch: Batch, views: list[str]) -> dict[str, torch.Tensor]:
        """Frozen features for scoring. Validation during a fit with dataset.cache_features scores the same
        images every epoch (a fixed, seeded split): their features are computed on the first pass and kept
        in memory for this fit (issue 11: validation every epoch must be cheap). Exact: the same tensors."""
        trainer = self._trainer
        memo = getattr(self, "_val_feature_memo", None)
        if (memo is None or trainer is None or trainer.state.fn != "fit"
                or not (trainer.validating or trainer.sanity_checking)):
            return self._feats(batch, views)
        return memo.features(batch.extra["index"], views, lambda: self._feats(batch, views))

    def _train_feats(self, batch: Batch, views: list[str]) -> dict[str, torch.Tensor]:
        cache = getattr(self, "_feature_cache", None)
        if cache is None:
            return self._feats(batch, views)
        return cache.features(batch.extra["index"], views, lambda: self._feats(batch, views))

    def finish_fit(self, datamodule: Any) -> None:
        """Store the views this fit trained (and the frozen features, when cached)."""
        cache = getattr(self, "_feature_cache", None)
        if cache is not None:
            cache.save()
            self.fit_info["feature_cache"] = {"hits": cache.hits, "misses": cache.misses}
        if self._cache is None:
            return
        for v in self.model.view_names:
            if v not in self.frozen_views:
                self._cache.store_head(self.view_keys[v], self.model.heads[v].state_dict())

    def _record(self, kind: str, entry: Any, split: str | None = None) -> None:
        """Cache hits go to `fit_info["view_cache"]` and to view_cache.json in the run dir."""
        info = self.fit_info.setdefault("view_cache", {"keys": dict(self.view_keys)})
        if split is None:
            info[kind] = entry
        else:
            info.setdefault(kind, {})[split] = entry
        if self._run_dir is not None and self.global_rank == 0:

            write_json(self._run_dir / "view_cache.json", info)

    # --- fit -----------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._val_feature_memo = None
        if getattr(self, "_feature_cache", None) is not None:

            self._val_feature_memo = FrozenFeatureCache(0)  # in memory only; filled by the first validation
        if self.model.banks_built:
            return  # resumed from a checkpoint: the bank is part of it
        dm = self.trainer.datamodule
        rank, world = self.trainer.global_rank, self.trainer.world_size
        loader = dm.fit_statistics_dataloader(rank=rank, world_size=world)
        for batch in tqdm(loader, desc="memory bank", disable=rank != 0, leave=False):
            batch = self.trainer.strategy.batch_to_device(batch, self.device)
            with torch.no_grad():
                self.model.build_bank_step(self._feats(batch, self.model.views_without_bank))
        self.model.finalize_banks(self.hparams.gamma_c, self.hparams.seed)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def calibrate(self, batches: Iterable[Batch]) -> None:
        """Per-location calibration of the "org" view on batches of normal training images (already on
        this device), for the heads as they are now; a no-op unless `calibration="location"`."""
        if self.model.calibration != "location":
            return
        self.model.heads["org"].calibrate(self._train_feats(batch, ["org"])["org"] for batch in batches)

    def _calibrate(self) -> None:
        """`calibrate` on the fit's training normals."""
        strategy = self.trainer.strategy
        self.calibrate(strategy.batch_to_device(batch, self.device)
                       for batch in self.trainer.datamodule.fit_statistics_dataloader())

    def on_validation_epoch_start(self) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._calibrate()  # heads moved since the last validation: validation sees calibrated maps
        self._start_split("val")

    def on_fit_end(self) -> None:
        memo = getattr(self, "_val_feature_memo", None)
        if memo is not None:
            self.fit_info["validation_feature_cache"] = {"hits": memo.hits, "misses": memo.misses}
        self._val_feature_memo = None
        self._calibrate()  # the last epoch's heads (a selected epoch's come with its checkpoint)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        trainable = [v for v in self.model.view_names if v not in self.frozen_views]
        loss, parts = self.model.loss(self._train_feats(batch, trainable))
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(batch))
        for v, p in parts.items():
            self.log(f"train/loss_{v}", p, on_step=False, on_epoch=True, batch_size=len(batch))
        self.log("train/radius", self.model.heads["org"].loss_fn.radius.detach(), on_step=False, on_epoch=True, batch_size=len(batch))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("model.backbone.")]
        return torch.optim.AdamW(
            params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, amsgrad=self.hparams.amsgrad
        )

    # --- inference ---------------------------------------------------------------------------------
    def _evaluating(self) -> bool:
        """True in trainer.validate / trainer.test (not in validation during fit: heads still move)."""
        trainer = self._trainer
        return trainer is not None and trainer.state.fn in ("validate", "test")

    def _maps_key(self, view: str, split: str) -> str:
        return digest([self.view_keys[view], state_digest(self.model.heads[view].state_dict()), split])

    def _start_split(self, split: str) -> None:
        self._split = split if self._evaluating() else None
        self._computed_maps = {v: {} for v in self.model.view_names}
        self._cached_maps = {}
        self._split_map_keys = {}
        self.view_outputs.pop(split, None)
        if self._split and self._cache is not None and self.view_keys:
            # heads are fixed while evaluating: the keys computed here hold until _end_split stores
            self._split_map_keys = {v: self._maps_key(v, split) for v in self.model.view_names}
            self._cached_maps = {v: self._cache.load_maps(key, split) for v, key in self._split_map_keys.items()}

    def _end_split(self, split: str) -> None:
        if self._split != split:
            return
        status = {}
        for v in self.model.view_names:
            new = self._computed_maps.get(v) or {}
            status[v] = "computed" if new else "hit"
            if new and v in self._split_map_keys:
                self._cache.store_maps(self._split_map_keys[v], split, {**self._cached_maps.get(v, {}), **new})
        if self._cache is not None:
            self._record("maps", status, split)
            log.info("view cache, %s maps: %s", split, status)
        out = self.view_outputs.get(split)
        if out:
            out["maps"] = {v: torch.cat(m) for v, m in out["maps"].items()}
            out["masks"] = torch.cat(out["masks"]) if out["masks"] and out["masks"][0] is not None else None
            out["labels"] = torch.cat(out["labels"])
        self._split = None

    def on_test_epoch_start(self) -> None:
        self._start_split("test")

    def on_validation_epoch_end(self) -> None:
        self._end_split("val")
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        self._end_split("test")
        super().on_test_epoch_end()

    def _collect(self, batch: Batch, views: dict[str, torch.Tensor]) -> None:
        """Keep unsmoothed per-view maps of the split, for α re-fusion (texad.methods.cfa.fusion)."""
        out = self.view_outputs.setdefault(
            self._split, {"paths": [], "types": [], "maps": {v: [] for v in views}, "masks": [], "labels": []}
        )
        out["paths"].extend(batch.path)
        out["types"].extend(batch.defect_type)
        for v, m in views.items():
            out["maps"][v].append(m.detach().float().cpu())
        out["masks"].append(None if batch.mask is None else batch.mask[:, 0].detach().cpu() > 0.5)
        out["labels"].append(batch.label.detach().cpu())

    def predict_maps(self, batch: Batch) -> dict[str, torch.Tensor]:
        if not self.model.banks_built:
            raise TexadError("CFA has no memory bank: train it first (or load a trained checkpoint)")
        size = tuple(batch.image.shape[-2:])
        views: dict[str, torch.Tensor] = {}
        if self._split:
            for v, cached in self._cached_maps.items():
                if cached and all(p in cached for p in batch.path):
                    views[v] = torch.stack([cached[p] for p in batch.path]).to(batch.image.device)
        todo = [v for v in self.model.view_names if v not in views]
        if todo:
            views.update(self.model.view_maps(self._fit_validation_feats(batch, todo), size, batch.superpixels))
            if self._split:
                for v in todo:
                    self._computed_maps[v].update(zip(batch.path, views[v].detach().float().cpu()))
        views = {v: views[v] for v in self.model.view_names}
        if self._split:
            self._collect(batch, views)
        amap = self.model.fuse(views)
        score = image_score_of(amap, self.hparams.image_score, self.hparams.image_score_fraction)
        out: dict[str, Any] = {"anomaly_map": amap, "pred_score": score}
        out["view_maps"] = views
        return out
