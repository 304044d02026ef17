"""Blind anomaly localisation: a per-location feature VAE and FCA on its residuals (README.md beside this file)."""

from texad.methods.blind_vae.lightning_model import BlindVAEMethod
from texad.methods.blind_vae.torch_model import FeatureVAE, residual_map_fca, residual_norm, smooth_and_clear_border

__all__ = ["BlindVAEMethod", "FeatureVAE", "residual_map_fca", "residual_norm", "smooth_and_clear_border"]
