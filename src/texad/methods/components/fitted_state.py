"""Fitted statistics kept as buffers whose shape is known only after fitting (banks, Gaussians, scales)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FittedBuffers"]


class FittedBuffers(nn.Module):
    """A module whose `fitted_buffers` start as empty placeholders and take the saved shapes on loading.

    Why: a memory bank, a set of Gaussians or a calibration has a shape only once fitted, and a
    placeholder of another shape cannot receive a saved tensor; before loading, each named buffer is
    replaced by an empty tensor of the saved shape (on the placeholder's device).
    """

    fitted_buffers: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.fitted_buffers:
            if prefix + name in state_dict:
                current = getattr(self, name)
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
