"""What of the clustering travels in its checkpoint besides the head's weights: the settings in use
(validation may have chosen them) and the selection record; the frozen backbone copies stay out."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from texad.methods.clustering.validation_choice import HeadSetting, RawSetting


def settings_state(settings: dict[str, Any], selection_record: dict[str, Any]) -> dict[str, Any]:
    """The module's extra state (`get_extra_state`): plain values only."""
    return {"settings": {"head": asdict(settings["head"]), "raw": asdict(settings["raw"]),
                         "k_rule": dict(settings["k_rule"])},
            "selection": selection_record}


def settings_from_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The settings (and the selection record, None when absent) back from `settings_state`."""
    saved = state["settings"]
    head = HeadSetting(**{**saved["head"], "layers": tuple(saved["head"]["layers"])})
    settings = {"head": head, "raw": RawSetting(saved["raw"]["temperature"], tuple(saved["raw"]["layers"])),
                "k_rule": dict(saved["k_rule"])}
    return settings, state.get("selection")


def frozen_key(key: str) -> bool:
    """State keys of frozen backbone weights (the main one and the localiser's copies/views)."""
    return ".backbone." in f".{key}"
