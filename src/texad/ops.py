"""Small tensor operations shared by several methods."""

from __future__ import annotations


import torch
import torch.nn.functional as F

from texad.errors import TexadError


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian with radius round(truncate·σ) (scipy's gaussian_filter convention)."""
    radius = max(1, int(truncate * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur2d(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of (B,H,W) or (B,C,H,W) maps with reflect padding; σ ≤ 0 is a no-op."""
    if sigma <= 0:
        return maps
    squeeze = maps.dim() == 3
    x = maps[:, None] if squeeze else maps
    b, c, h, w = x.shape
    k = gaussian_kernel1d(sigma, truncate).to(x)
    r = k.numel() // 2
    x = x.reshape(b * c, 1, h, w)
    # reflect padding needs pad < size; very small maps fall back to replicate
    mode_h = "reflect" if r < h else "replicate"
    mode_w = "reflect" if r < w else "replicate"
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode_h), k.view(1, 1, -1, 1))
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode_w), k.view(1, 1, 1, -1))
    x = x.reshape(b, c, h, w)
    return x[:, 0] if squeeze else x


IMAGE_SCORES = ("max", "top_mean")


def image_score(maps: torch.Tensor, rule: str = "max", fraction: float = 0.01) -> torch.Tensor:
    """(B,H,W) maps → (B,) image scores: the map's maximum (the papers' rule), or `top_mean`: the mean of
    its top `fraction` of pixels (at least one), which one extreme pixel cannot decide alone."""
    flat = maps.flatten(1)
    if rule == "max":
        return flat.amax(1)
    if rule == "top_mean":
        if not 0.0 < fraction <= 1.0:
            raise TexadError(f"method.image_score_fraction must be in (0, 1], got {fraction}")
        k = max(1, int(round(fraction * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(1)
    raise TexadError(f"method.image_score must be one of {list(IMAGE_SCORES)}, got {rule!r}")


def adopt_saved_shapes(module: torch.nn.Module, state_dict: dict, prefix: str, names: tuple[str, ...]) -> None:
    """Before `_load_from_state_dict`: give the buffers `names` of `module` the shapes saved in `state_dict`.

    Fitted statistics (memory banks, Gaussians, calibrations) start as empty placeholders whose shape is
    only known after fitting; a placeholder cannot receive a saved tensor of another shape.
    """
    for name in names:
        if prefix + name in state_dict:
            current = getattr(module, name)
            setattr(module, name, torch.empty_like(state_dict[prefix + name], device=current.device))


def chunk_rows_for_budget(n_cols: int, bytes_per_elem: int, budget_mb: float) -> int:
    """How many rows of an (rows × n_cols) temporary fit in `budget_mb` megabytes (at least 1)."""
    return max(1, int(budget_mb * 2**20 // max(1, n_cols * bytes_per_elem)))


__all__ = ["IMAGE_SCORES", "adopt_saved_shapes", "chunk_rows_for_budget", "gaussian_blur2d", "gaussian_kernel1d", "image_score"]
