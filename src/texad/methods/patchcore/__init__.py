"""PatchCore: a coreset memory bank of locally aware patch features (README.md beside this file)."""

from texad.methods.patchcore.lightning_model import PatchCore

__all__ = ["PatchCore"]
