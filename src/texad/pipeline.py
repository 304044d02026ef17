"""train(cfg) and evaluate(cfg): the whole job behind train.py and evaluate.py.

train: seed → build datamodule, backbone and method from the config → fit (resuming from a
checkpoint when there is one) → validate and test on one device → metrics.json in the run dir.
evaluate: rebuild everything from the config saved in a checkpoint → validate and test → the same
metrics.json.
"""

from __future__ import annotations

import logging
import signal
import time
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from texad.errors import TexadError
from texad.feature_store import attach_store
from texad.methods.base import IMAGE_SCORER, AnomalyModule
from texad.metrics.bootstrap import STATISTICS_FILE
from texad.metrics.reasons import null_reasons
from texad.outputs import METRIC_KEYS, atomic_write, read_torch_file, write_json
from texad.resume import ResumeCheckpoint
from texad.selection import BEST_CKPT as SELECTED_STEM
from texad.selection import EpochSelection

log = logging.getLogger(__name__)

LAST_CKPT = "last.ckpt"
BEST_CKPT = f"{SELECTED_STEM}.ckpt"  # the epoch selection's checkpoint (texad.selection): the model train.py tested


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, AnomalyModule]:
    """Datamodule and method from the config (the backbone is built once and handed to the method)."""
    datamodule = instantiate(cfg.dataset, _convert_="all")
    backbone = instantiate(cfg.backbone, _convert_="all")
    attach_store(backbone, cfg.get("feature_cache"), cache_dir=str(cfg.paths.cache_dir))  # before the method's views of it
    method = instantiate(cfg.method, backbone=backbone, _convert_="all")
    method.texad_config = OmegaConf.to_container(cfg, resolve=True)
    output_dir = cfg.paths.get("output_dir")
    method.output_dir = Path(str(output_dir)) if output_dir else None
    method.attach_views(datamodule, cache_dir=str(cfg.paths.cache_dir), output_dir=method.output_dir,
                        run_description=method.describe_run(method.texad_config))
    return datamodule, method


def build_loggers(cfg: DictConfig) -> list:
    """`logger=` is one logger config (csv, wandb, tensorboard) or, for several, a dict of them."""
    loggers = cfg.get("logger") or {}
    if "_target_" in loggers:
        return [instantiate(loggers)]
    return [instantiate(conf) for conf in loggers.values() if conf is not None and "_target_" in conf]


def resume_checkpoint(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    """An explicit ckpt_path, else the run dir's last.ckpt when resume is on (an interrupted run goes on;
    the line "resuming from epoch N of M" is logged by `texad.resume.ResumeCheckpoint` as it loads)."""
    if cfg.get("ckpt_path"):
        path = Path(str(cfg.ckpt_path)).expanduser()
        if not path.is_file():
            raise TexadError(f"ckpt_path {str(path)!r} does not exist")
        check_checkpoint_file(path, "ckpt_path")
        return str(path)
    last = ckpt_dir / LAST_CKPT
    if cfg.get("resume", True) and last.is_file():
        check_checkpoint_file(last, "resume=true")
        check_same_settings(cfg, last)
        return str(last)
    return None


#: what decides a run's numbers, compared before a run dir's last.ckpt is resumed (paths may move)
RESUMED_SECTIONS = ("seed", "method", "backbone", "dataset")
PATH_KEYS = ("root", "cache_dir", "geometry_cache", "checkpoint")
#: a resumed run may train longer than it was first told to (the fit goes on from where it stopped)
MAY_GROW = ("method.epochs", "method.max_steps")


def check_same_settings(cfg: DictConfig, last: Path) -> None:
    """Resuming a run dir's last.ckpt under other settings (another lr, epochs, set) would silently mix
    two runs: refuse it, naming what differs."""
    _, saved = load_checkpoint_config(last)
    now = OmegaConf.to_container(cfg, resolve=True)

    def flat(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                if key not in PATH_KEYS:
                    out.update(flat(item, f"{prefix}.{key}"))
            return out
        return {prefix: value}

    differ = []
    for section in RESUMED_SECTIONS:
        before, after = flat(saved.get(section), section), flat(now.get(section), section)
        differ += [f"{k}: {before.get(k, '(unset)')!r} → {after.get(k, '(unset)')!r}"
                   for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k) and k not in MAY_GROW]
    if differ:
        shown = "; ".join(differ[:5]) + (f"; and {len(differ) - 5} more" if len(differ) > 5 else "")
        raise TexadError(f"resume=true: {str(last)!r} was written by a run with other settings ({shown}); "
                         f"use another hydra.run.dir, or resume=false to train afresh in this one")


def check_checkpoint_file(path: Path, key: str) -> None:
    """A torch checkpoint is a zip archive: a truncated one lacks its end record (cheap to test)."""
    if not zipfile.is_zipfile(path):
        raise TexadError(f"{key}: checkpoint {str(path)!r} is truncated or not a torch checkpoint; remove it "
                         f"(or pass resume=false) to train afresh")


def evaluation_trainer(cfg: DictConfig, loggers: list, callbacks: list | None = None) -> L.Trainer:
    """Validation and test run on one device: DDP would pad the test set with duplicates."""
    accelerator = cfg.trainer.get("accelerator", "auto")
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=loggers or False,
        callbacks=callbacks or [],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bool(cfg.trainer.get("enable_progress_bar", True)),
        inference_mode=True,
    )


def run_evaluation(
    cfg: DictConfig, datamodule: L.LightningDataModule, method: AnomalyModule, loggers: list
) -> dict[str, Any]:
    trainer = evaluation_trainer(cfg, loggers, instantiate_callbacks(cfg.get("eval_callbacks")))
    datamodule.setup("fit")
    results: dict[str, Any] = {}
    if len(datamodule.val_samples) > 0:
        trainer.validate(method, dataloaders=datamodule.val_dataloader(), verbose=False)
        results["val"] = method.results.get("val", {})
    trainer.test(method, datamodule=datamodule, verbose=False)
    results["test"] = method.results["test"]
    return results


def instantiate_callbacks(conf: DictConfig | None) -> list:
    if not conf:
        return []
    return [instantiate(c) for c in conf.values() if c is not None and "_target_" in c]


def metrics_record(cfg: DictConfig, results: dict[str, Any], wall_time: float, extra: dict | None = None) -> dict:
    """metrics.json: the test metrics at top level, validation metrics under 'val'."""
    test = results["test"]
    record: dict[str, Any] = {k: test.get(k) for k in METRIC_KEYS}
    record.update({k: v for k, v in test.items() if k not in record})
    record["val"] = results.get("val", {})
    record["method"] = cfg.method.get("name")
    record["dataset"] = cfg.dataset.get("name", cfg.dataset.get("_target_"))
    record["backbone"] = cfg.backbone.get("name")
    record["seed"] = cfg.get("seed")
    record["wall_time_s"] = round(wall_time, 3)
    record.update(extra or {})
    return record


def explain_nulls(record: dict[str, Any], datamodule: L.LightningDataModule) -> dict[str, Any]:
    """`inputs` (the pre-fit check's counts) and a `reasons` entry beside every null metric, with one
    warning line naming them (texad.metrics.reasons)."""
    inputs = dict(getattr(datamodule, "input_report", {}) or {})
    record["inputs"] = inputs
    size = getattr(datamodule, "image_size", None)
    pixels = int(size[0]) * int(size[1]) if size else None
    has_val = bool(record.get("val"))
    for where, part in (("test", record), ("val", record.get("val") or {})):
        reasons = null_reasons(part, inputs if where == "test" else {}, pixels if where == "test" else None, has_val)
        if reasons:
            part["reasons"] = reasons
            log.warning("%s metrics null: %s", where, "; ".join(f"{k} ({v})" for k, v in reasons.items()))
    return record


def train(cfg: DictConfig) -> dict[str, Any]:
    start = time.time()
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    datamodule, method = build(cfg)
    loggers = build_loggers(cfg)
    fit_info: dict[str, Any] = {}
    fit_start = time.time()
    if method.prepare_fit(datamodule):
        checkpoint = ResumeCheckpoint(ckpt_dir / LAST_CKPT)  # last.ckpt after every epoch (texad.resume)
        selection = epoch_selection(cfg, datamodule, method, ckpt_dir)
        # last.ckpt last: it must hold the state the epoch selection's own checkpoint reached in that epoch
        callbacks = [*(selection.callbacks if selection else []), *instantiate_callbacks(cfg.get("callbacks")), checkpoint]
        trainer = instantiate(
            cfg.trainer, logger=loggers or False, callbacks=callbacks, _convert_="all",
            **(selection.trainer_kwargs if selection else {}),
        )
        try:
            trainer.fit(method, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, ckpt_dir))
        except SIGTERMException as stop:  # Lightning's SystemExit without a code would exit 0
            raise SystemExit(128 + signal.SIGTERM) from stop
        # last.ckpt is the model as the fit left it, after on_fit_end (e.g. calibration) and also when no
        # epoch ran (epochs=0: the model is its memory bank). save_checkpoint is a collective: every rank calls it
        trainer.save_checkpoint(ckpt_dir / LAST_CKPT)
        rank = trainer.global_rank
        leave_process_group()
        if rank != 0:
            return {}
        if selection:
            fit_info = selection.restore_best(method)
        method.finish_fit(datamodule)
        # the whole fit as a user waits for it: bank, epochs, validation passes of the epoch selection
        fit_info["fit_time_s"] = round(time.time() - fit_start, 3)
        fit_info["epochs_run"] = int(trainer.current_epoch)
        method = method.to(torch.device("cpu")) if cfg.trainer.get("accelerator") == "cpu" else method
    else:
        log.info("method %s needs no fit (zero-shot or cached)", cfg.method.get("name"))
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_untrained_checkpoint(method, ckpt_dir / LAST_CKPT)
    results = run_evaluation(cfg, datamodule, method, loggers)
    store_image_rule(method, checkpoint_file(out_dir))
    # seconds this process spent choosing the image-score rule (every validation pass; a timing, like fit_time_s)
    fit_info["image_rule_time_s"] = round(float(getattr(method, "image_rule_seconds", 0.0)), 4)
    record = metrics_record(cfg, results, time.time() - start, {**(getattr(method, "fit_info", None) or {}), **fit_info})
    explain_nulls(record, datamodule)
    write_statistics(method, out_dir)
    write_json(out_dir / "metrics.json", record)
    log.info("metrics: %s", {k: record[k] for k in METRIC_KEYS})
    return record


def epoch_selection(cfg: DictConfig, datamodule: L.LightningDataModule, method: AnomalyModule, ckpt_dir: Path):
    """Validation-based epoch selection (texad.selection) when configured, epochs run and validation exists."""
    conf = cfg.get("selection") or {}
    every = int(conf.get("every_n_epochs") or 0)
    epochs = int(cfg.trainer.get("max_epochs") or 0)
    if every <= 0 or epochs <= 0 or not method.selects_epochs:
        return None
    datamodule.setup("fit")
    if len(datamodule.val_samples) == 0:
        log.info("no validation split (setting=%s): the last epoch is kept", getattr(datamodule, "setting", "?"))
        return None
    return EpochSelection(every, str(cfg.get("optimized_metric")), ckpt_dir, conf.get("patience"))


def leave_process_group() -> None:
    """After a DDP fit, evaluation runs on rank 0 alone: the other ranks are done."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def store_image_rule(method: AnomalyModule, path: Path) -> None:
    """The image-score rule and calibration the evaluation chose on validation, into the checkpoint that
    evaluate.py and predict.py load: predict has no validation pass to choose them again, and its image
    threshold is the validation threshold of that rule."""
    state = {k: v for k, v in method.state_dict().items() if k.startswith(IMAGE_SCORER + ".")}
    if not state or not path.is_file():
        return
    checkpoint = read_torch_file(path, "checkpoint", weights_only=False)
    checkpoint["state_dict"].update({k: v.detach().cpu() for k, v in state.items()})
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def save_untrained_checkpoint(method: AnomalyModule, path: Path) -> None:
    """Zero-shot methods still leave a checkpoint, so evaluate.py works the same for every method."""
    checkpoint = {"state_dict": method.state_dict(), "hyper_parameters": dict(method.hparams)}
    method.on_save_checkpoint(checkpoint)
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def checkpoint_file(ckpt_path: str | Path) -> Path:
    """`ckpt_path` as a file: a run dir (or its checkpoints/) means the model that run tested, i.e.
    `best.ckpt` (the validation-selected epoch) where epoch selection ran, else `last.ckpt`."""
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_dir():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for name in (BEST_CKPT, LAST_CKPT):
        if (folder / name).is_file():
            return folder / name
    raise TexadError(f"ckpt_path {str(path)!r} is a folder without {BEST_CKPT} or {LAST_CKPT} "
                     f"(expected a run dir, its checkpoints/ folder, or a .ckpt file)")


#: method keys renamed since a checkpoint may have been written: old name → new name
RENAMED_METHOD_KEYS = {"loss_alpha": "loss_margin"}  # CFA: α is only the fusion weights now


def _rename_keys(conf: Any, renamed: dict[str, str]) -> None:
    """Rename old keys in a saved method config, in place (also in nested localiser configs)."""
    if not isinstance(conf, dict):
        return
    for old, new in renamed.items():
        if old in conf and new not in conf:
            conf[new] = conf.pop(old)
    for value in conf.values():
        _rename_keys(value, renamed)


def load_checkpoint_config(ckpt_path: str | Path) -> tuple[dict, dict]:
    path = checkpoint_file(ckpt_path)
    checkpoint = read_torch_file(path, "ckpt_path (expected a run dir or <run dir>/checkpoints/best.ckpt or last.ckpt)",
                                 weights_only=False)
    saved = checkpoint.get("texad_config") if isinstance(checkpoint, dict) else None
    if not saved:
        raise TexadError(f"checkpoint {str(path)!r} was not written by texad (no saved config)")
    _rename_keys(saved.get("method"), RENAMED_METHOD_KEYS)
    if isinstance(saved.get("dataset"), dict):  # CFA's own switch before texad.feature_store (top-level feature_cache)
        saved["dataset"].pop("cache_features", None)
    backbone = saved.get("backbone")
    if isinstance(backbone, dict) and "alignment" not in backbone:
        # written before texad.geometry: its heads and banks were fitted on the legacy cell centres
        log.warning("checkpoint %s predates map alignment: evaluated with backbone.alignment=legacy", path)
        backbone["alignment"] = "legacy"
    return checkpoint, saved


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the model from the checkpoint's saved config and evaluate it."""
    start = time.time()
    if not cfg.get("ckpt_path"):
        raise TexadError("evaluate.py needs ckpt_path=<run dir> (or a .ckpt file of it)")
    ckpt_file = checkpoint_file(cfg.ckpt_path)
    checkpoint, saved = load_checkpoint_config(ckpt_file)
    saved_method = saved["method"].get("name")
    wanted = cfg.method.get("name") if cfg.get("method") else None
    if wanted and wanted != saved_method:
        raise TexadError(
            f"checkpoint {cfg.ckpt_path!r} belongs to method {saved_method!r}, not {wanted!r}"
        )
    run_cfg = OmegaConf.create(saved)
    for key in ("paths", "logger", "eval_callbacks", "feature_cache"):
        if cfg.get(key) is not None:
            run_cfg[key] = cfg[key]
    for key, value in (cfg.get("overrides") or {}).items():
        OmegaConf.update(run_cfg, key, value, force_add=True)
    L.seed_everything(run_cfg.seed, workers=True)
    datamodule, method = build(run_cfg)
    method.load_method_state(checkpoint["state_dict"])
    loggers = build_loggers(run_cfg)
    results = run_evaluation(run_cfg, datamodule, method, loggers)
    extra: dict[str, Any] = {"ckpt_path": str(ckpt_file)}
    fusion = cfg.get("fusion") or {}
    if fusion.get("search"):
        extra["fusion"] = method.refuse(results, fusion)
    record = metrics_record(run_cfg, results, time.time() - start, extra)
    explain_nulls(record, datamodule)
    write_statistics(method, Path(cfg.paths.output_dir))
    write_json(Path(cfg.paths.output_dir) / "metrics.json", record)
    return record


def write_statistics(method: AnomalyModule, out_dir: Path) -> None:
    """The test pass's per-image statistics (`texad.metrics.bootstrap`), for paired comparisons."""
    stats = getattr(method, "test_statistics", None)
    if stats is not None:
        stats.save(out_dir / STATISTICS_FILE)
