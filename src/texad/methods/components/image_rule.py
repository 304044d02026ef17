"""The image-score rule of every localizer, chosen per run on validation image AUROC.

`AnomalyModule` inherits this mixin; it needs three hooks there: `_eval_step` passes each batch's map
and the method's own score through `image_rule_step`, `_compute` calls `image_rule_select(stage)` first
and records `image_rule_record()` as `image_score` in the results (metrics.json).

How: during validation the maps are kept (CPU), every rule of
`texad.methods.components.score_calibration.RULES` scores them and the one with the highest
validation AUROC is kept (ties → the simplest); the validation image metrics and threshold are then
those of the chosen rule. The calibrated rules use the calibration the method fitted on k-fold
held-out *training* normals (memory-bank methods, `image_scorer.fit(maps, "train_kfold")` during the
fit) or, for methods without one (zero-shot, blind, trained descriptors), a calibration fitted on
the *validation* normals, cross-fitted so that no validation normal is scored by a calibration it
entered; the test then uses the calibration of all validation normals. Validation normals thus serve
both the calibration and the rule / threshold choice, but never score themselves.

The method key `image_rule` (auto in the localizers' configs; a method without the key keeps `official`)
fixes a rule instead: `official` is main's behaviour
(the method's own pred_score), `max`, `top_mean`, `calibrated`, `calibrated_upper`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from texad.errors import TexadError
from texad.methods.components.score_calibration import CALIBRATED, RULES, ImageScorer, choose_rule, cross_fitted
from texad.metrics.functional import f1_at_threshold, image_scores, roc_auc

log = logging.getLogger(__name__)

IMAGE_SCORER = "image_scorer"


class ImageRuleMixin:
    """Image-score rule choice on validation; state in `self.image_scorer` (an ImageScorer, in checkpoints)."""

    def _init_image_rule(self) -> None:
        self.image_scorer = ImageScorer()
        self._rule_buffer: dict[str, list] = {}
        self._rule_record: dict[str, Any] = {}
        self.image_rule_seconds = 0.0  # time spent choosing rules in this process (all validation passes)
        self._val_thresholds: dict[str, float] = {}  # rule → its best-F1 threshold on validation

    @property
    def image_rule_setting(self) -> str:
        # methods that do not declare the key keep their own score (e.g. clustering)
        setting = str(getattr(self, "hparams", {}).get("image_rule", "official"))
        if setting != "auto" and setting not in RULES:
            raise TexadError(f"method.image_rule must be 'auto' or one of {list(RULES)}, got {setting!r}")
        return setting

    def image_rule_step(self, stage: str, amap: torch.Tensor, score: torch.Tensor, labels: torch.Tensor | None,
                        types: Any = ()) -> torch.Tensor:
        """The image score of a batch under the run's rule. Validation keeps the maps and returns the
        method's own score; `image_rule_select` then re-scores validation under the chosen rule."""
        setting = self.image_rule_setting
        if setting == "official":
            self.image_scorer.set_rule("official")
            return score
        if stage == "val" and labels is not None and bool((labels >= 0).all()):
            buf = self._rule_buffer
            buf.setdefault("maps", []).append(amap.detach().float().cpu())
            buf.setdefault("official", []).append(score.detach().float().cpu())
            buf.setdefault("labels", []).append(labels.detach().cpu())
            buf.setdefault("types", []).extend(types)
            return score
        if setting != "auto":
            self.image_scorer.set_rule(setting)
        if stage == "test" and labels is not None and bool((labels >= 0).all()) and self._val_thresholds:
            # every rule's test scores, for the report `test_by_rule` (never used to choose anything)
            buf = self._rule_buffer
            for name, s in self.image_scorer.scores(amap.float(), score).items():
                buf.setdefault(name, []).append(s)
            buf.setdefault("labels", []).append(labels.detach().cpu())
        return self.image_scorer.score(amap.float(), score)

    def image_rule_select(self, stage: str) -> None:
        """At the end of validation: score every rule, choose, and redo the validation image metrics.
        At the end of a test: report every rule's test AUROC, best F1 and F1 at its validation threshold."""
        if stage == "test":
            self._report_test_by_rule()
            return
        if stage != "val":
            return
        buf, self._rule_buffer = self._rule_buffer, {}
        setting = self.image_rule_setting
        start = time.perf_counter()
        if not buf:
            self._rule_record = {"rule": self.image_scorer.rule_name, "setting": setting,
                                 "note": "no labelled validation images: rule not chosen"}
            return
        maps, official = torch.cat(buf["maps"]), torch.cat(buf["official"])
        labels = torch.cat(buf["labels"]).long()
        scorer = self.image_scorer
        calibration: dict[str, Any] = {"source": scorer.source_name, "normal_maps": int(scorer.n_fit)}
        try:
            if scorer.source_name == "train_kfold":
                scores = scorer.scores(maps, official)
            else:  # no held-out training maps: cross-fit on the validation normals
                scores = scorer.scores(maps, official, calib={})  # no calibrated rules yet
                fitted, full = cross_fitted(scorer, maps, labels)
                scores.update(fitted)
                n_normal = int((labels == 0).sum())
                for name, value in full.items():
                    setattr(scorer, name, value.to(scorer.rule.device))
                scorer.source.fill_(2)
                scorer.n_fit.fill_(n_normal)
                calibration = {"source": "validation (cross-fitted)", "normal_maps": n_normal}
        except TexadError as err:
            if setting in CALIBRATED:
                raise
            log.warning("image score calibration skipped: %s", err)
            scores = {k: v for k, v in scorer.scores(maps, official, calib={}).items()}
            calibration = {"source": "none", "note": str(err)}
        aurocs = {name: float(roc_auc(s, labels)) for name, s in scores.items()}
        self._val_thresholds = {name: float(image_scores(s, labels)["image_f1_threshold"]) for name, s in scores.items()}
        chosen = setting if setting != "auto" else choose_rule(aurocs, [r for r in RULES if r in aurocs])
        scorer.set_rule(chosen)
        metric = self.metrics["val_image"]
        metric.reset()
        metric.update(scores[chosen].float(), labels)
        self._typed_scores["val"] = list(zip(scores[chosen].tolist(), buf["types"]))
        seconds = time.perf_counter() - start
        self.image_rule_seconds += seconds
        # the time spent choosing stays out of the record: metrics.json's records must equal across a resume
        self._rule_record = {"rule": chosen, "setting": setting, "candidates": aurocs, "calibration": calibration}
        log.info("image score rule: %s (validation AUROC %s)", chosen, aurocs)

    def _report_test_by_rule(self) -> None:
        buf, self._rule_buffer = self._rule_buffer, {}
        self._rule_record.pop("test_by_rule", None)
        if not buf.get("labels"):
            return
        labels = torch.cat(buf["labels"]).long()
        report = {}
        for name, threshold in self._val_thresholds.items():
            if name not in buf:
                continue
            s = torch.cat(buf[name])
            best = image_scores(s, labels)
            report[name] = {"image_auroc": best["image_auroc"], "image_f1": best["image_f1"],
                            "image_f1_at_val": float(f1_at_threshold(s, labels, threshold))}
        self._rule_record["test_by_rule"] = report

    def image_rule_record(self, stage: str) -> dict[str, Any]:
        """What metrics.json records as `image_score` for a stage."""
        if self.image_rule_setting == "official":
            return {"rule": "official", "setting": "official"}
        if stage == "val":
            return {k: v for k, v in self._rule_record.items() if k != "test_by_rule"}
        if self._rule_record:
            return dict(self._rule_record)
        return {"rule": self.image_scorer.rule_name, "setting": self.image_rule_setting,
                "calibration": {"source": self.image_scorer.source_name, "normal_maps": int(self.image_scorer.n_fit)}}
