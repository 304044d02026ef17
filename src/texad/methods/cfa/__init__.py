"""CFA and Sp-CFA: patch descriptors against a memory bank of normal features (README.md beside this file)."""

from texad.methods.cfa.lightning_model import CFA

__all__ = ["CFA"]
