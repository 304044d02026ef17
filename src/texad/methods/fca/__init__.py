"""FCA: zero-shot texture anomaly localisation by feature correspondence analysis."""

from texad.methods.fca.torch_model import FCA, gaussian_kernel_1d, patch_reference, scale_features_minmax

__all__ = ["FCA", "gaussian_kernel_1d", "patch_reference", "scale_features_minmax"]
