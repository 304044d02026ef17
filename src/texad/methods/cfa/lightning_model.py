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
from texad.methods.cfa.fusion import BLUR_ORDERS, order_blurred, view_records
from texad.methods.cfa.torch_model import CFAModel
from texad.methods.cfa.fusion import refuse_method
from texad.methods.cfa.view_cache import ViewCache, run_description, state_digest, view_description
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
        image_rule: str = "auto",  # image-score rule (texad.methods.components.image_rule)
        slic: dict | None = None,
        view_cache: bool = False,
        score: str = "softmin",
        input_padding: int = 0,
        input_padding_mode: str = "reflect",
        image_score: str = "max",
        image_score_fraction: float = 0.01,
        calibration: str = "none",
        blur_order: str = "after",
        view_overlays: int = 8,
    ) -> None:
        super().__init__()
        region_sizes = [None if r is None else int(r) for r in region_sizes]
        _check_alpha(alpha, region_sizes)
        if blur_order not in BLUR_ORDERS:
            raise TexadError(f"method.blur_order must be one of {list(BLUR_ORDERS)}, got {blur_order!r}")
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
        self._calibrated_at: int | None = None

    # --- superpixel views requested from the datamodule -----------------------------------------
    @property
    def view_region_sizes(self) -> list[int]:
        return [self.model.region_sizes[v] for v in self.model.view_names[1:]]

    describe_run = staticmethod(run_description)  # what decides a trained view (cache keys)

    def refuse(self, results: dict[str, Any], options: Any) -> dict[str, Any]:
        """α re-chosen on validation from the kept per-view maps (`texad.methods.cfa.fusion.refuse_method`)."""
        return refuse_method(self, results, options)

    def attach_views(
        self, datamodule: Any, *, cache_dir: str | Path, output_dir: str | Path | None, run_description: dict[str, Any]
    ) -> None:
        """Give the datamodule a picklable SLIC + mosaic builder; compute the views' cache keys.

        `cache_dir` holds superpixels and trained views; `output_dir` (the run dir)
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
        store = self.model.backbone.feature_store
        self._store_start = store.stats() if store is not None else {}
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

    def finish_fit(self, datamodule: Any) -> None:
        """Store the views this fit trained."""
        store = self.model.backbone.feature_store  # frozen features: texad.feature_store, below every method
        if store is not None:  # this fit's lookups
            start = getattr(self, "_store_start", {})
            self.fit_info["feature_cache"] = {k: v - start.get(k, 0) for k, v in store.stats().items()}
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
        self._calibrated_at = None  # optimiser step of the last calibration in this fit
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
        self.model.heads["org"].calibrate(self._feats(batch, ["org"])["org"] for batch in batches)

    def _calibrate(self) -> None:
        """`calibrate` on the fit's training normals; skipped when no optimiser step ran since the last one
        (the fit's end right after the last epoch's validation): the same heads give the same scale."""
        if self.model.calibration == "none" or self._calibrated_at == self.trainer.global_step:
            return
        strategy = self.trainer.strategy
        self.calibrate(strategy.batch_to_device(batch, self.device)
                       for batch in self.trainer.datamodule.fit_statistics_dataloader())
        self._calibrated_at = self.trainer.global_step

    def on_validation_epoch_start(self) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._calibrate()  # heads moved since the last validation: validation sees calibrated maps
        self._start_split("val")

    def on_fit_end(self) -> None:
        self._calibrate()  # the last epoch's heads (a selected epoch's come with its checkpoint)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        trainable = [v for v in self.model.view_names if v not in self.frozen_views]
        loss, parts = self.model.loss(self._feats(batch, trainable))
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
        # "maps-3": a superpixel view's cached map is (2,H,W): unsmoothed, and blurred in mosaic coordinates
        # with blur_sigma (so the key holds it: a run that changes only blur_sigma must not reuse the maps)
        return digest([self.view_keys[view], state_digest(self.model.heads[view].state_dict()), split, "maps-3",
                       float(self.hparams.blur_sigma)])

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
            out["mosaic_blurred"] = {v: torch.cat(m) for v, m in out["mosaic_blurred"].items()}
            out["masks"] = torch.cat(out["masks"]) if out["masks"] and out["masks"][0] is not None else None
            out["labels"] = torch.cat(out["labels"])
        self._split = None

    def on_test_epoch_start(self) -> None:
        self._start_split("test")

    def on_validation_epoch_end(self) -> None:
        self._end_split("val")
        super().on_validation_epoch_end()
        if self._evaluating():
            self._view_record("val")

    def on_test_epoch_end(self) -> None:
        self._end_split("test")
        super().on_test_epoch_end()
        if self._evaluating():
            self._view_record("test")

    def predict_maps(self, batch: Batch) -> dict[str, torch.Tensor]:
        if not self.model.banks_built:
            raise TexadError("CFA has no memory bank: train it first (or load a trained checkpoint)")
        size = tuple(batch.image.shape[-2:])
        views: dict[str, torch.Tensor] = {}
        pre: dict[str, torch.Tensor] = {}  # superpixel views blurred in mosaic coordinates, mapped back
        if self._split:
            for v, cached in self._cached_maps.items():
                if cached and all(p in cached for p in batch.path):
                    stacked = torch.stack([cached[p] for p in batch.path]).to(batch.image.device)
                    if v == "org":
                        views[v] = stacked
                    else:
                        views[v], pre[v] = stacked[:, 0], stacked[:, 1]
        todo = [v for v in self.model.view_names if v not in views]
        if todo:
            views.update(self.model.view_maps(self._feats(batch, todo), size, batch.superpixels, pre))
            if self._split:
                for v in todo:
                    kept = views[v] if v == "org" else torch.stack([views[v], pre[v]], dim=1)
                    self._computed_maps[v].update(zip(batch.path, kept.detach().float().cpu()))
        views = {v: views[v] for v in self.model.view_names}
        if self._split:
            self._collect(batch, views, pre)
        if self.hparams.blur_order == "mosaic" and len(views) > 1:
            alpha = self.model.alpha
            amap = sum(alpha.get(v, 0.0) * (self.model.fuse({v: m}, {v: 1.0}) if v == "org" else pre[v])
                       for v, m in views.items())
        else:
            amap = self.model.fuse(views)
        score = image_score_of(amap, self.hparams.image_score, self.hparams.image_score_fraction)
        out: dict[str, Any] = {"anomaly_map": amap, "pred_score": score}
        out["view_maps"] = views
        return out

    # --- each view alone (metrics.json `views`, view overlays) -----------------------------------
    def _view_record(self, split: str) -> None:
        """Put each view's metrics alone under `results[split]["views"]` (Sp-CFA only)."""
        out = self.view_outputs.get(split)
        if not out or len(out["maps"]) < 2 or split not in self.results:
            return
        rule = (self.hparams.image_score, self.hparams.image_score_fraction)
        self.results[split]["views"] = view_records(out, float(self.hparams.blur_sigma), self.hparams.blur_order, rule)
        self.results[split]["blur_order"] = self.hparams.blur_order
        if split == "test" and self._run_dir is not None and self.hparams.view_overlays > 0:
            self._write_view_overlays(out)

    def _write_view_overlays(self, out: dict[str, Any]) -> None:
        """overlays_views/<type>/<name>.png: input with the ground truth, the fused map and each view
        alone (blurred as fused), each on its own colour scale over the split, for a few test images."""
        from texad.methods.cfa.figures import view_overlay_figure
        from texad.viz import save_figure

        blurred = order_blurred(out, float(self.hparams.blur_sigma), self.hparams.blur_order)
        alpha = self.model.alpha
        fused = sum(alpha.get(v, 0.0) * torch.from_numpy(b) for v, b in blurred.items()).numpy()
        panels = {"fused": fused, **blurred}
        ranges = {k: (float(m.min()), float(m.max())) for k, m in panels.items()}
        for i in self._overlay_indices(out):
            name = Path(out["paths"][i]).stem
            kind = str(out["types"][i] or "unknown")
            fig = view_overlay_figure(out["images"][i], {k: m[i] for k, m in panels.items()}, ranges,
                                      None if out["masks"] is None else out["masks"][i].numpy(),
                                      title=f"{kind}/{name}  α={[round(alpha.get(v, 0.0), 3) for v in blurred]}  "
                                            f"blur {self.hparams.blur_order}")
            save_figure(fig, self._run_dir / "overlays_views" / kind / f"{name}.png")

    def _overlay_indices(self, out: dict[str, Any]) -> list[int]:
        """Up to `view_overlays` test images whose picture was kept, round-robin over the defect types."""
        by_type: dict[str, list[int]] = {}
        for i in sorted(out["images"]):
            by_type.setdefault(str(out["types"][i]), []).append(i)
        rounds = max((len(g) for g in by_type.values()), default=0)
        order = [g[r] for r in range(rounds) for g in by_type.values() if r < len(g)]
        return order[: self.hparams.view_overlays]

    def _collect(self, batch: Batch, views: dict[str, torch.Tensor], pre: dict[str, torch.Tensor]) -> None:
        """Keep unsmoothed per-view maps of the split (and the superpixel views blurred in mosaic
        coordinates), for α / blur-order re-fusion (texad.methods.cfa.fusion) and the views' record."""
        out = self.view_outputs.setdefault(
            self._split, {"paths": [], "types": [], "maps": {v: [] for v in views}, "masks": [], "labels": [],
                          "mosaic_blurred": {v: [] for v in pre}, "images": {}}
        )
        if self._split == "test" and len(views) > 1:  # pictures for the view overlays: a few per type
            from texad.data.images import denormalize

            dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            mean, std = getattr(dm, "mean", None), getattr(dm, "std", None)
            per_type = [str(t) for t in out["types"]]
            for i, kind in enumerate(batch.defect_type):
                if mean is not None and per_type.count(str(kind)) < 2:
                    out["images"][len(out["paths"]) + i] = denormalize(batch.image[i].detach().cpu(), mean, std)
                per_type.append(str(kind))
        out["paths"].extend(batch.path)
        out["types"].extend(batch.defect_type)
        for v, m in views.items():
            out["maps"][v].append(m.detach().float().cpu())
        for v, m in pre.items():
            out["mosaic_blurred"][v].append(m.detach().float().cpu())
        out["masks"].append(None if batch.mask is None else batch.mask[:, 0].detach().cpu() > 0.5)
        out["labels"].append(batch.label.detach().cpu())
