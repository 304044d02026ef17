"""PaDiM: one Gaussian per feature-map location (README.md beside this file)."""

from texad.methods.padim.lightning_model import PaDiM

__all__ = ["PaDiM"]
