"""FCA: zero-shot texture anomaly localisation by feature correspondence analysis."""

from texad.methods.fca.torch_model import FCA, gaussian_kernel_1d, patch_reference, scale_features_minmax

__all__ = ["FCA", "FCAMethod", "gaussian_kernel_1d", "patch_reference", "scale_features_minmax"]


def __getattr__(name: str):
    # the Lightning method imports Lightning and timm: load it only when asked for
    if name == "FCAMethod":
        from texad.methods.fca.lightning_model import FCAMethod

        return FCAMethod
    raise AttributeError(name)
