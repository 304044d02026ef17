"""Every input read once before the fit, so bad data stops a run before it has trained for nothing.

Images: header and file structure (`texad.data.images.image_header`), not a full decode. Masks: decoded
(they are what the metrics count), checked against their image's size, binarised by the stated rule
(pixel > 0 is defective) with one warning when some hold more than two levels, and defective images
whose mask is empty are named in one warning and counted (metrics.json `inputs`): their ground truth
says "defective" with no defective pixel, which lowers every pixel metric.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from texad.data.images import image_header, mask_levels
from texad.data.layout import Sample

log = logging.getLogger(__name__)

NAMED = 10  # files named in one warning line; the count covers all


def check_inputs(train: Sequence[Sample], val: Sequence[Sample], test: Sequence[Sample]) -> dict[str, Any]:
    """Read every image header and every mask; raise TexadError on the first unreadable or mismatched
    file; return what metrics.json records about the test set (counts, empty masks)."""
    start = time.perf_counter()
    seen: set = set()
    for sample in [*train, *val]:
        if sample.path not in seen:
            seen.add(sample.path)
            image_header(sample.path)
    empty, not_binary, defect_pixels = [], [], 0
    for sample in test:
        shape = image_header(sample.path)
        if sample.mask_path is None:
            continue
        count, binary = mask_levels(sample.mask_path, sample.path, shape)
        if sample.label == 1:
            defect_pixels += count
            if count == 0:
                empty.append(str(sample.path))
        if not binary:
            not_binary.append(str(sample.mask_path))
    n_defective = sum(s.label == 1 for s in test)
    report: dict[str, Any] = {
        "n_test_normal": len(test) - n_defective,
        "n_test_defective": n_defective,
        "test_has_masks": any(s.mask_path is not None for s in test if s.label == 1),
        "test_defect_pixels": defect_pixels,
        "empty_defect_masks": len(empty),
        "non_binary_masks": len(not_binary),
        "check_time_s": round(time.perf_counter() - start, 3),
    }
    if empty:
        report["empty_defect_mask_images"] = empty
        log.warning("%d defective test image(s) have an empty mask (no defective pixel; they count as defective "
                    "images with no defect to find): %s%s", len(empty), ", ".join(empty[:NAMED]),
                    f" and {len(empty) - NAMED} more" if len(empty) > NAMED else "")
    if not_binary:
        log.warning("%d mask(s) hold more than two grey levels, binarised by the rule 'pixel > 0 is defective': %s%s",
                    len(not_binary), ", ".join(not_binary[:NAMED]),
                    f" and {len(not_binary) - NAMED} more" if len(not_binary) > NAMED else "")
    log.info("inputs checked: %d training/validation and %d test images, %d masks in %.2f s", len(seen), len(test),
             sum(s.mask_path is not None for s in test), report["check_time_s"])
    return report
