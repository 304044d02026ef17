"""Why a metric is null: every null in metrics.json comes with a reason beside it (`reasons`).

A metric is undefined when the test set lacks what it ranks: pixel metrics need a defective pixel
in the masks (and masks at all), image metrics a normal and a defective image, AUPIMO enough normal
pixels for its lowest false-positive rate (`texad.metrics.aupimo`), the F1 at validation's threshold a
validation split. The reason is read from the counts of the pre-fit input check
(`texad.data.checks`), so it names the cause in the data rather than the arithmetic.
"""

from __future__ import annotations

from typing import Any

from texad.metrics.aupimo import DEFAULT_FPR_BOUNDS

PIXEL_KEYS = ("pixel_auroc", "pixel_aupro", "pixel_aupr", "pixel_f1", "pixel_f1_threshold", "pixel_f1_at_val")
IMAGE_KEYS = ("image_auroc", "image_f1", "image_f1_threshold", "image_f1_at_val")


def _image_reason(inputs: dict[str, Any]) -> str | None:
    if inputs.get("n_test_defective", 1) == 0:
        return "no defective image in the test set"
    if inputs.get("n_test_normal", 1) == 0:
        return "no normal (good) image in the test set"
    return None


def _pixel_reason(inputs: dict[str, Any]) -> str | None:
    if not inputs.get("test_has_masks", True):
        return "the data set has no pixel masks (no ground_truth/ folder)"
    if inputs.get("n_test_defective", 1) == 0:
        return "no defective image in the test set"
    if inputs.get("test_defect_pixels", 1) == 0:
        return "no defective pixel in the test masks"
    return None


def null_reasons(test: dict[str, Any], inputs: dict[str, Any], image_pixels: int | None = None,
                 has_validation: bool = True) -> dict[str, str]:
    """A reason for every top-level null number of a stage's record (`test`)."""
    reasons: dict[str, str] = {}
    for key, value in test.items():
        if value is not None or key in ("reasons", "ci95", "image_auroc_per_type"):
            continue
        reason = None
        if key.endswith("_at_val") and not has_validation:
            reason = "no validation split: no threshold was chosen on validation"
        elif key in PIXEL_KEYS:
            reason = _pixel_reason(inputs)
        elif key in IMAGE_KEYS:
            reason = _image_reason(inputs)
        elif key == "pixel_aupimo":
            reason = _pixel_reason(inputs) or _image_reason(inputs)
            if reason is None and image_pixels:
                normal_pixels = inputs.get("n_test_normal", 0) * image_pixels
                needed = 1.0 / DEFAULT_FPR_BOUNDS[0]
                if normal_pixels < needed:
                    reason = (f"too few normal pixels for its lowest false-positive rate {DEFAULT_FPR_BOUNDS[0]:g}: "
                              f"{normal_pixels} in {inputs.get('n_test_normal', 0)} normal images, needs {needed:.0f}")
        elif key == "ring_ratio":
            reason = "no normal test image (or maps too small for a border ring)"
        elif key.startswith("map_offset"):
            reason = _pixel_reason(inputs) or "no defect large enough to measure the map's offset"
        if reason is None and key.endswith("_at_val"):
            reason = _pixel_reason(inputs) if key.startswith("pixel") else _image_reason(inputs)
            reason = reason or "validation chose no threshold"
        reasons[key] = reason or "undefined for this run's maps (e.g. constant scores); see the log"
    return reasons
