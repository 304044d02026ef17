"""Entry-point glue: run a job, turning TexadError into a one-line message and exit status 1."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from texad.errors import TexadError

log = logging.getLogger("texad")


def run_job(job: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> float | None:
    """Run train/evaluate; return the optimized metric (for sweepers) when there is one."""
    try:
        record = job(cfg)
    except TexadError as err:
        log.error("%s", err)
        print(f"texad: error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        finish_wandb()
    return optimized_value(cfg, record)


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


def check_group_overrides(argv: list[str], conf_dir: Path) -> None:
    """Refuse an unknown option of a config group with the full list of choices.

    Hydra's own message lists only the top level of a group (it would hide mvtec/<category>).
    """
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key.startswith(("+", "~", "-")) or "." in key or "(" in value:
            continue
        if "/" in key or key == "hydra" or not (conf_dir / key).is_dir():
            continue  # nested groups (hydra/launcher=joblib) may come from plugins
        choices = config_choices(conf_dir, key)
        for option in value.split(","):
            if option and option != "null" and option not in choices:
                print(f"texad: error: unknown {key} {option!r}; choices: {', '.join(choices)}", file=sys.stderr)
                sys.exit(1)
