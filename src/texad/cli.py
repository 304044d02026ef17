"""Entry-point glue: run a job, turning TexadError into a one-line message and exit status 1.

Bad input reaches the entry points wrapped in two ways, and both are unwrapped here so the user
sees one `texad: error: ...` line naming the file or key:
- Hydra's `instantiate` re-raises an error of a constructor as `InstantiationException` ("Error in
  call to target ...") with the original as its `__cause__`;
- torch's DataLoader re-raises an error of a worker process as the same type with the message
  "Caught TexadError in DataLoader worker process N.\\nOriginal Traceback ...": the original message
  is the tail after the last "<module>.TexadError: " of that traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from texad.data import layout
from texad.errors import TexadError

log = logging.getLogger("texad")

DATA_ROOT_KEY = "paths.data_root"
DATA_ROOT_ENV = "TEXAD_DATA_ROOT"


def run_job(job: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> float | None:
    """Run train/evaluate; return the optimized metric (for sweepers) when there is one."""
    try:
        check_data_root(cfg)
        record = job(cfg)
    except Exception as err:
        texad_error = find_texad_error(err)
        if texad_error is None:
            raise
        message = error_message(texad_error)
        log.debug("texad error", exc_info=err)
        log.error("%s", message)
        print(f"texad: error: {message}", file=sys.stderr)
        sys.exit(1)
    finally:
        finish_wandb()
    return optimized_value(cfg, record)


def find_texad_error(err: BaseException) -> TexadError | None:
    """`err` itself or the first TexadError it was raised from (Hydra's instantiate wraps it)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, TexadError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def error_message(err: TexadError) -> str:
    """The error's own message; for one re-raised from a DataLoader worker, the original message."""
    text = str(err)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        cls = type(err)
        for marker in (f"\n{cls.__module__}.{cls.__qualname__}: ", f"\n{cls.__qualname__}: "):
            at = text.rfind(marker)
            if at >= 0:
                return text[at + len(marker):].strip()
    return text


def check_data_root(cfg: DictConfig) -> None:
    """A data set read from a folder needs that folder: say which key sets it and the layout expected.

    Runs before anything is built, so `python train.py dataset=mvtec/wood` without data fails at once
    with the key the README uses (`paths.data_root`, or `dataset.root` for `dataset=folder`).
    """
    dataset = cfg.get("dataset") if isinstance(cfg, DictConfig) else None
    if not isinstance(dataset, DictConfig):
        return
    raw_dataset = OmegaConf.to_container(dataset, resolve=False)  # `"root" in dataset` is False for ???
    if "root" not in raw_dataset:
        return
    if not OmegaConf.is_missing(dataset, "root"):
        value = dataset.get("root")
        if value is not None and str(value).strip() not in ("", "???"):
            return
    raw = str(raw_dataset.get("root"))
    name = dataset.get("name") or "this data set"
    key = DATA_ROOT_KEY if DATA_ROOT_KEY in raw else "dataset.root"
    layout = layout_help(str(dataset.get("_target_", "")), dataset.get("category")).replace("<root>", f"<{key}>")
    if key == DATA_ROOT_KEY:
        raise TexadError(
            f"{DATA_ROOT_KEY} is not set: dataset {name} reads its images under {DATA_ROOT_KEY}; "
            f"give {DATA_ROOT_KEY}=/path/to/data (or set the environment variable {DATA_ROOT_ENV})"
            + (f"; {layout}" if layout else "")
        )
    raise TexadError(
        "dataset.root is not set: give the data set folder with dataset.root=/path/to/data"
        + (f"; {layout}" if layout else "")
    )


def layout_help(target: str, category: str | None = None) -> str:
    """The folder layout a datamodule reads (from texad.data.layout), '' for an unknown one."""
    helps = {
        "MVTecDataModule": layout.MVTEC_LAYOUT_HELP,
        "KSDD2DataModule": layout.KSDD2_LAYOUT_HELP,
        "MTDDataModule": layout.MTD_LAYOUT_HELP,
    }
    text = helps.get(target.rsplit(".", 1)[-1], "")
    if text and category and "<category>" in text:
        text = text.replace("<category>", str(category))
    elif text and category is None and "<root>/<category>/" in text:  # dataset=folder: root is the category
        text = text.replace("<root>/<category>/", "<root>/")
    return text


def optimized_value(cfg: DictConfig, record: dict[str, Any]) -> float | None:
    key = cfg.get("optimized_metric")
    if not key or not record:
        return None
    stage, _, name = key.partition("/")
    value = (record.get(stage) or {}).get(name) if stage == "val" else record.get(name or stage)
    return None if value is None else float(value)


def finish_wandb() -> None:
    """Close a W&B run so the next job of a multirun does not log into it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def config_choices(conf_dir: Path, group: str) -> list[str]:
    """Every option of a config group, nested ones included (e.g. dataset: textures/brick)."""
    base = conf_dir / group
    return sorted(str(p.relative_to(base).with_suffix("")) for p in base.rglob("*.yaml"))


def extra_config_dirs(argv: list[str]) -> list[Path]:
    """Config dirs a user adds on the command line (`--config-dir DIR`, `--config-dir=DIR`, `-cd DIR`):
    their groups' options count too (e.g. a method of one's own, docs/adding-a-method.md)."""
    dirs = []
    for i, arg in enumerate(argv):
        if arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
        elif arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
    return dirs


def check_group_overrides(argv: list[str], conf_dir: Path) -> None:
    """Refuse an unknown option of a config group with the full list of choices.

    Hydra's own message lists only the top level of a group (it would hide mvtec/<category>).
    """
    extra = extra_config_dirs(argv)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key.startswith(("+", "~", "-")) or "." in key or "(" in value:
            continue
        if "/" in key or key == "hydra" or not (conf_dir / key).is_dir():
            continue  # nested groups (hydra/launcher=joblib) may come from plugins
        choices = sorted({c for d in (conf_dir, *extra) if (d / key).is_dir() for c in config_choices(d, key)})
        for option in value.split(","):
            if option and option != "null" and option not in choices:
                print(f"texad: error: unknown {key} {option!r}; choices: {', '.join(choices)}", file=sys.stderr)
                sys.exit(1)
