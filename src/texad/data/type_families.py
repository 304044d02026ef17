"""Defect families for choosing the anomaly clustering on validation: confusable pairs, no test generator.

The clustering's settings (the head's τ, layers, pair mining, negatives, epochs, and the rule that
estimates the number of types) can only be chosen on defect *types* with known labels that are not the
test types. Families that are trivially apart (a disc, a tint, stripes) let every setting reach NMI 1
and choose nothing, so these come in pairs that differ in one attribute only, the way real defect
types do (two kinds of contamination, a fine and a coarse scratch):

| pair | families | what differs | what they share |
|---|---|---|---|
| foreign material | `blob_grain`, `blob_weave` | fill: isotropic fine grain vs an oriented grating | hard-edged irregular blob, size, mean shift, contrast |
| lines | `line_thin`, `line_thick` | width (1–1.5 vs 4–6 px at 256²) | straight segment, length, brighter or darker |
| spots | `spot_soft`, `spot_sharp` | edge: Gaussian fall-off vs a 1 px edge | round spot, brightness shift, texture kept |
| contrast | `contrast_up`, `contrast_down` | local contrast × 2.2–3 vs × 0.1–0.3 | ellipse, smooth edge, local mean kept |

None of them is drawn by a generator of the test families (`texad.data.synthetic.DEFECT_TYPES`) or of
the validation-only ones (Perlin, CutPaste); they share only the compositing, the border margin and the
area bounds of `plant_defect`. Sizes scale with the image, contrasts with its standard deviation.
"""

from __future__ import annotations

import cv2
import numpy as np

from texad.data.synthetic import Layer, Surface, blob_distance, draw_polylines, ellipse_radii, fit_inside, plant_defect

TYPE_FAMILIES = (
    "blob_grain", "blob_weave", "line_thin", "line_thick", "spot_soft", "spot_sharp", "contrast_up", "contrast_down",
)


def plant_family(image: np.ndarray, family: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A copy of a uint8 image with one defect of `family` (`TYPE_FAMILIES`) and its bool mask."""
    return plant_defect(image, family, rng, painters=_PAINTERS)


def _blob(surface: Surface) -> tuple[np.ndarray, np.ndarray]:
    """Opacity of a hard-edged irregular blob (1 px anti-aliased edge) and a unit-contrast sign for its fill."""
    ry, rx = ellipse_radii(surface, surface.rng.uniform(0.012, 0.035), max_aspect=1.8)
    distance, radius = blob_distance(surface, ry, rx, wobble=0.25, harmonics=5)
    alpha = np.clip((1 - distance) * radius + 0.5, 0, 1)
    return alpha, np.array(surface.rng.choice([-1.0, 1.0]))


def _fill(surface: Surface, pattern: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """A foreign material: `pattern` (H, W) standardised, the blob's own mean and contrast."""
    pattern = (pattern - pattern.mean()) / max(float(pattern.std()), 1e-6)
    mean = surface.mean + sign * surface.rng.uniform(0.4, 0.8) * surface.std
    return mean + pattern[..., None] * surface.rng.uniform(0.9, 1.4) * surface.std


def _paint_blob_grain(surface: Surface) -> list[Layer]:
    alpha, sign = _blob(surface)
    grain = surface.rng.normal(0, 1, (surface.height, surface.width)).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), sigmaX=max(0.6, surface.side / 200))
    return [(alpha, _fill(surface, grain, sign))]


def _paint_blob_weave(surface: Surface) -> list[Layer]:
    alpha, sign = _blob(surface)
    rng = surface.rng
    period = surface.side * rng.uniform(1 / 40, 1 / 25)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:surface.height, 0:surface.width].astype(np.float32)
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period
    return [(alpha, _fill(surface, np.sin(phase), sign))]


def _line(surface: Surface, width: float) -> list[Layer]:
    rng = surface.rng
    length = surface.side * rng.uniform(0.3, 0.6)
    theta = rng.uniform(0, np.pi)
    points = np.linspace(0, 1, 32)[:, None] * length * np.array([np.cos(theta), np.sin(theta)])
    alpha = draw_polylines(surface, [(fit_inside(surface, points), width, 1.0)]) * rng.uniform(0.85, 1.0)
    sign = rng.choice([-1.0, 1.0])
    return [(alpha, surface.pixels + sign * rng.uniform(1.5, 2.2) * surface.std)]


def _paint_line_thin(surface: Surface) -> list[Layer]:
    return _line(surface, max(1.0, surface.side / 256 * surface.rng.uniform(1.0, 1.5)))


def _paint_line_thick(surface: Surface) -> list[Layer]:
    return _line(surface, max(3.0, surface.side / 256 * surface.rng.uniform(4.0, 6.0)))


def _spot(surface: Surface, soft: bool) -> list[Layer]:
    rng = surface.rng
    ry, rx = ellipse_radii(surface, rng.uniform(0.008, 0.025), max_aspect=1.4)
    distance, radius = blob_distance(surface, ry, rx, wobble=0.05, harmonics=2, extent=1.6 if soft else 1.05)
    if soft:  # Gaussian fall-off, half opacity at the outline
        alpha = np.exp(-np.log(2) * distance**2)
    else:
        alpha = np.clip((1 - distance) * radius + 0.5, 0, 1)
    sign = rng.choice([-1.0, 1.0])
    return [(alpha * rng.uniform(0.85, 1.0), surface.pixels + sign * rng.uniform(1.2, 1.8) * surface.std)]


def _paint_spot_soft(surface: Surface) -> list[Layer]:
    return _spot(surface, soft=True)


def _paint_spot_sharp(surface: Surface) -> list[Layer]:
    return _spot(surface, soft=False)


def _contrast(surface: Surface, gain: float) -> list[Layer]:
    ry, rx = ellipse_radii(surface, surface.rng.uniform(0.01, 0.03), max_aspect=2.0)
    distance, _ = blob_distance(surface, ry, rx, wobble=0.1, harmonics=3)
    ramp = np.clip((1 - distance) / 0.3, 0, 1)  # smooth edge over the outer 30 % of the radius
    alpha = ramp * ramp * (3 - 2 * ramp)
    local = cv2.GaussianBlur(surface.pixels, (0, 0), sigmaX=max(1.0, surface.side / 64)).reshape(surface.pixels.shape)
    return [(alpha, local + (surface.pixels - local) * gain)]


def _paint_contrast_up(surface: Surface) -> list[Layer]:
    return _contrast(surface, surface.rng.uniform(2.2, 3.0))


def _paint_contrast_down(surface: Surface) -> list[Layer]:
    return _contrast(surface, surface.rng.uniform(0.1, 0.3))


_PAINTERS = {
    "blob_grain": _paint_blob_grain,
    "blob_weave": _paint_blob_weave,
    "line_thin": _paint_line_thin,
    "line_thick": _paint_line_thick,
    "spot_soft": _paint_spot_soft,
    "spot_sharp": _paint_spot_sharp,
    "contrast_up": _paint_contrast_up,
    "contrast_down": _paint_contrast_down,
}
