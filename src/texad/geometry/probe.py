"""The true cell centres of a frozen network's layers, measured once with an impulse probe and cached.

Convolution geometry alone (centre of cell i = stride·i for timm's symmetric padding) is not where a
trained layer *looks*: efficientnet_lite0's ImageNet weights centre its stride-8 and stride-16 cells
about 4 and 6 px up-left of that, and its maps drew
defects there. So the probe measures each layer's effective centre with the real weights:

* an image of the normalised mean colour (zeros), and the same image with a bright or a dark square of
  side 1, 8 or 24 px (a dot, and blobs the size of small defects: trained layers answer edges of a blob a
  little differently from a dot, ~1.5 px at stride 16 for efficientnet_lite0);
* per layer, the response Σ_channels |f(square) − f(blank)| and its centroid over the cells (in cell units);
* each square visits 8 phases of the coarsest stride along the diagonal, so the lattice does not bias
  the centroid; offset = mean over squares, signs and phases of (square centre − stride·centroid).

The probe image is large enough that the responses stay clear of the map border (checked: less than
0.1 % of the response mass in the outer eighth of the map, else the probe size doubles), and its size
is congruent to the real input size modulo 2·S per axis, so networks whose padding depends on the input
size (TF "same") are probed in the same padding phase. Results are kept in memory and, with a cache
dir, in `<cache>/<digest>.json`, keyed by a digest of the network's weights, its layers and the phase.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch

from texad.errors import TexadError
from texad.geometry.grid import Grid, even_grid
from texad.outputs import write_json

log = logging.getLogger(__name__)

__all__ = ["ALIGNMENTS", "LayerGeometry", "PROBE_VERSION", "probe_offsets", "weights_digest"]

#: probed: measured cell centres (default) | legacy: the align_corners=False assumption (texad ≤ 0.1)
ALIGNMENTS = ("probed", "legacy")
#: bump when the probe's definition changes (cached results are then measured again)
PROBE_VERSION = 2
MIN_PROBE_SIDE = 512
MAX_PROBE_SIDE = 2048
#: sides of the probe squares (a dot, and blobs like small defects), each bright and dark on the mean grey
SQUARE_SIDES = (1, 8, 24)
#: positions per square along the diagonal, spread over the coarsest stride (lattice phases)
PHASES = 8
EDGE_MASS = 1e-3

_MEMORY: dict[str, list[tuple[float, float]]] = {}


def weights_digest(module: torch.nn.Module) -> str:
    """sha1 of every parameter and buffer (names, shapes and bytes): which network is probed."""
    h = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _probe_side(side: int, period: int) -> int:
    """The smallest side >= MIN_PROBE_SIDE congruent to `side` modulo `period`."""
    return MIN_PROBE_SIDE + (side - MIN_PROBE_SIDE) % period


@torch.no_grad()
def probe_offsets(extract: Callable[[torch.Tensor], Sequence[torch.Tensor]], strides: Sequence[int],
                  size: tuple[int, int], channels: int = 3) -> tuple[list[tuple[float, float]], tuple[int, int]]:
    """Effective (offset_y, offset_x) of each layer of `extract` (cell i centred at offset + stride·i).

    `size` is a probe image size (see the module docstring); returns the offsets and the size used
    (doubled while responses reach the map border).
    """
    coarsest = max(int(s) for s in strides)
    phases = list(range(0, coarsest, max(1, coarsest // PHASES)))
    h, w = size
    while True:
        blank = torch.zeros(1, channels, h, w)
        reference = [m.double() for m in extract(blank)]
        sums = torch.zeros(len(strides), 2, dtype=torch.float64)
        counts = [0] * len(strides)
        edge, total = [0.0] * len(strides), [0.0] * len(strides)
        for side in SQUARE_SIDES:
            y0, x0 = h // 2 - (coarsest + side) // 2, w // 2 - (coarsest + side) // 2
            for amplitude in (1.0, -1.0):
                images = blank.repeat(len(phases), 1, 1, 1)
                for n, k in enumerate(phases):
                    images[n, :, y0 + k:y0 + k + side, x0 + k:x0 + k + side] = amplitude
                centres = torch.tensor([[y0 + k + (side - 1) / 2, x0 + k + (side - 1) / 2] for k in phases],
                                       dtype=torch.float64)
                for layer, (ref, out) in enumerate(zip(reference, extract(images))):
                    response = (out.double() - ref).abs().sum(1)  # (phases, h_l, w_l)
                    mass = response.sum((1, 2))
                    live = mass > 0  # a phase may miss a layer (e.g. a 1×1 stride-2 shortcut alone)
                    if not bool(live.any()):
                        continue
                    response, mass = response[live], mass[live]
                    n_y, n_x = response.shape[-2:]
                    ring_y, ring_x = max(1, n_y // 8), max(1, n_x // 8)
                    edge[layer] += float(mass.sum() - response[:, ring_y:n_y - ring_y, ring_x:n_x - ring_x].sum())
                    total[layer] += float(mass.sum())
                    rows = (response.sum(2) * torch.arange(n_y, dtype=torch.float64)).sum(1) / mass
                    cols = (response.sum(1) * torch.arange(n_x, dtype=torch.float64)).sum(1) / mass
                    found = torch.stack([rows, cols], 1) * strides[layer]
                    sums[layer] += (centres[live] - found).sum(0)
                    counts[layer] += int(live.sum())
        if not torch.isfinite(sums).all():
            raise TexadError("geometry probe: the layers' responses are not finite (activations overflow); "
                             "cannot locate their cells")
        if any(c == 0 for c in counts):
            dead = [i for i, c in enumerate(counts) if c == 0]
            raise TexadError(f"geometry probe: layers {dead} do not respond to an impulse; cannot locate their cells")
        worst = max(e / t for e, t in zip(edge, total))
        if worst <= EDGE_MASS:
            return [(float(s[0]) / c, float(s[1]) / c) for s, c in zip(sums, counts)], (h, w)
        if 2 * max(h, w) > MAX_PROBE_SIDE:
            raise TexadError(f"geometry probe: layer responses still reach the map border at {h}x{w} "
                             f"({worst:.1%} of their mass); the receptive field is too large to probe")
        h, w = 2 * h, 2 * w


class LayerGeometry:
    """Per-layer `Grid`s of one frozen network for an input size: probed (cached) or the legacy assumption.

    `extract(images) -> list of maps` is the network; `strides` its layers' strides; `network` a
    callable giving the module whose weights identify it (hashed only when a probe is needed).
    """

    def __init__(self, extract: Callable[[torch.Tensor], Sequence[torch.Tensor]], strides: Sequence[int],
                 network: Callable[[], torch.nn.Module], description: str, alignment: str = "probed",
                 cache_dir: str | Path | None = None) -> None:
        if alignment not in ALIGNMENTS:
            raise TexadError(f"backbone.alignment must be one of {list(ALIGNMENTS)}, got {alignment!r}")
        self.extract, self.strides = extract, [int(s) for s in strides]
        self.network, self.description = network, description
        self.alignment = alignment
        self.cache_dir = Path(str(cache_dir)) if cache_dir else None
        self._digest: str | None = None

    def grids(self, input_hw: tuple[int, int], map_hws: Sequence[tuple[int, int]]) -> list[Grid]:
        """The grid of each layer's map (`map_hws`) for an input of `input_hw` pixels, in input coordinates."""
        if self.alignment == "legacy":
            return [even_grid(tuple(m), tuple(input_hw)) for m in map_hws]
        offsets = self.offsets(input_hw)
        return [Grid((float(s), float(s)), o) for s, o in zip(self.strides, offsets)]

    def grids_of(self, input_hw: tuple[int, int], maps: Sequence[torch.Tensor]) -> list[Grid]:
        """`grids` for the network's output `maps` on an input of `input_hw`."""
        return self.grids(tuple(input_hw), [tuple(m.shape[-2:]) for m in maps])

    def offsets(self, input_hw: tuple[int, int]) -> list[tuple[float, float]]:
        period = 2 * max(self.strides)
        size = tuple(_probe_side(int(s), period) for s in input_hw)
        if self._digest is None:
            self._digest = weights_digest(self.network())
        key = hashlib.sha1(json.dumps({
            "version": PROBE_VERSION, "network": self._digest, "description": self.description,
            "strides": self.strides, "phase": [s % period for s in size], "size": list(size),
        }, sort_keys=True).encode()).hexdigest()[:24]
        if key in _MEMORY:
            return _MEMORY[key]
        path = self.cache_dir / f"{key}.json" if self.cache_dir else None
        if path is not None and path.is_file():
            try:
                stored = json.loads(path.read_text())
                offsets = [tuple(float(v) for v in o) for o in stored["offsets"]]
                if len(offsets) == len(self.strides):
                    _MEMORY[key] = offsets
                    return offsets
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("geometry cache %s is unreadable; probing again", path)
        offsets, used = probe_offsets(self.extract, self.strides, size)
        log.info("geometry probe of %s at %dx%d: cell offsets %s", self.description, *used,
                 [(round(a, 2), round(b, 2)) for a, b in offsets])
        _MEMORY[key] = offsets
        if path is not None:

            write_json(path, {"description": self.description, "strides": self.strides, "probe_size": list(used),
                              "offsets": [list(o) for o in offsets], "version": PROBE_VERSION})
        return offsets
