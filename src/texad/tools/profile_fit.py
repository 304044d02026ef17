"""`python -m texad.tools.profile_fit <train.py overrides>`: CFA fit time per stage (wall and CPU seconds).

Wraps the backbone forward, CFA feature post-processing, nearest search, loss, backward, calibration,
prediction and validation of one `texad.pipeline.train` run, and prints per-epoch (wall, CPU) seconds,
per-stage totals, call counts, the test metrics and the feature-cache counts as JSON. CPU time of a
one-thread run (OMP_NUM_THREADS=1) stays comparable on a shared machine where wall time does not.
"""
import json, sys, time, collections
import torch
from texad.tools import compose_train
from texad import pipeline, backbones
from texad.methods.cfa import torch_model as tm, lightning_model as lm
from texad.methods.components import nearest


def main(argv=None):
    """Patch the stage timers in (this process only), run the fit, print the JSON."""
    EP = []; T = collections.defaultdict(float); C = collections.defaultdict(float); N = collections.Counter()
    def timed(name, fn):
        def w(*a, **k):
            t0 = time.perf_counter(); c0 = time.process_time(); r = fn(*a, **k)
            T[name] += time.perf_counter() - t0; C[name] += time.process_time() - c0; N[name] += 1; return r
        return w
    backbones.channels_last_forward = timed("backbone_forward", backbones.channels_last_forward)
    tm.CFAModel.features = timed("features_total(incl backbone)", tm.CFAModel.features)
    tm.nearest_sq_distances = timed("nearest_search", tm.nearest_sq_distances)
    tm.CFAHead.loss = timed("head_loss(incl search)", tm.CFAHead.loss)
    lm.CFA.training_step = timed("training_step(fwd)", lm.CFA.training_step)
    lm.CFA._calibrate = timed("calibrate", lm.CFA._calibrate)
    from texad.methods import base as _base
    _base.AnomalyModule.on_validation_epoch_end = timed("val_metrics(on_validation_epoch_end)", _base.AnomalyModule.on_validation_epoch_end)
    lm.CFA.predict_maps = timed("predict_maps(val+test)", lm.CFA.predict_maps)
    import lightning as L
    orig_fit = L.Trainer.fit
    class Timer(L.Callback):
        def _s(self, k): setattr(self, k, (time.perf_counter(), time.process_time()))
        def _e(self, k, name):
            t0, c0 = getattr(self, k); T[name] += time.perf_counter() - t0; C[name] += time.process_time() - c0; N[name] += 1
        def on_train_epoch_start(self, t, m): self._s("t0")
        def on_train_epoch_end(self, t, m):
            t0, c0 = self.t0; EP.append((round(time.perf_counter() - t0, 2), round(time.process_time() - c0, 2)))
            self._e("t0", "epoch(train+validation)")
        def on_validation_epoch_start(self, t, m): self._s("v0")
        def on_validation_epoch_end(self, t, m): self._e("v0", "validation_epoch(incl calibrate, metrics)")
        def on_before_backward(self, t, m, loss): self._s("b0")
        def on_after_backward(self, t, m): self._e("b0", "backward")
    def fit(self, *a, **k):
        self.callbacks.append(Timer()); t0 = time.perf_counter(); c0 = time.process_time(); r = orig_fit(self, *a, **k)
        T["trainer.fit"] += time.perf_counter() - t0; C["trainer.fit"] += time.process_time() - c0; return r
    L.Trainer.fit = fit
    cfg = compose_train(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter(); c0 = time.process_time()
    rec = pipeline.train(cfg)
    T["total"] = time.perf_counter() - t0; C["total"] = time.process_time() - c0
    print(json.dumps({"epochs_wall_cpu_s": EP, "wall_s": {k: round(v, 2) for k, v in T.items()}, "cpu_s": {k: round(v, 2) for k, v in C.items()}, "calls": dict(N),
                      "metrics": {k: rec.get(k) for k in ("image_auroc", "pixel_auroc", "pixel_aupr", "pixel_aupro", "val_curve")}, "feature_cache": rec.get("feature_cache"),
                      "epochs_run": rec.get("epochs_run"), "fit_time_s": rec.get("fit_time_s")}, indent=1))


if __name__ == "__main__":
    main()
