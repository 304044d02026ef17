"""What several methods share, one idea per module: layer selection (`layers`), exact nearest-vector search
(`nearest`), the feature maps FCA-style methods read (`feature_maps`), FCA's patch-statistics scorer (`fca`),
Gaussian kernels and blur (`gaussian`), image scores from maps (`image_score`) and their calibration on
held-out normal maps (`score_calibration`, chosen per run by `image_rule`), and fitted buffers that take their saved shapes (`fitted_state`).

No method imports another method: what two of them need lives here. Components import nothing from
`texad.methods` outside this package: a base class methods derive from (`AnomalyModule`,
`StatisticsModule`) lives with the methods.
"""
