"""FCA: zero-shot texture anomaly localisation by feature correspondence analysis (README.md beside this file)."""

from texad.methods.fca.lightning_model import FCAMethod

__all__ = ["FCAMethod"]
