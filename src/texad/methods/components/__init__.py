"""What several methods share, one idea per module: layer selection (`layers`), exact nearest-vector search
(`nearest`), the feature maps FCA-style methods read (`feature_maps`), FCA's patch-statistics scorer (`fca`),
Gaussian kernels and blur (`gaussian`), image scores from maps (`image_score`) and their calibration on
held-out normal maps (`score_calibration`), fitted buffers that take
their saved shapes (`fitted_state`), and the no-gradient fit of statistics methods (`statistics_fit`).

No method imports another method: what two of them need lives here.
"""
