"""Blind anomaly localisation: a per-location feature VAE and FCA on its residuals."""

from texad.methods.blind_vae.torch_model import FeatureVAE, residual_map_fca, residual_norm, smooth_and_clear_border

__all__ = ["BlindVAEMethod", "FeatureVAE", "residual_map_fca", "residual_norm", "smooth_and_clear_border"]


def __getattr__(name: str):
    # the Lightning method imports Lightning and timm: load it only when asked for
    if name == "BlindVAEMethod":
        from texad.methods.blind_vae.lightning_model import BlindVAEMethod

        return BlindVAEMethod
    raise AttributeError(name)
