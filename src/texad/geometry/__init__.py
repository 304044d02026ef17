"""Map geometry, owned in one place: where each feature cell sits in the image, and resampling on that.

`grid` holds the coordinate frame (`Grid`) and the only resampling of feature and score maps
(`resample`); `probe` measures each layer's true cell centres for a frozen network (`LayerGeometry`).
"""

from texad.geometry.grid import PIXELS, RESAMPLE_MODES, Grid, even_grid, resample, sampling_matrix
from texad.geometry.probe import ALIGNMENTS, LayerGeometry, probe_offsets, weights_digest

__all__ = [
    "ALIGNMENTS", "Grid", "LayerGeometry", "PIXELS", "RESAMPLE_MODES", "even_grid", "probe_offsets", "resample",
    "sampling_matrix", "weights_digest",
]
