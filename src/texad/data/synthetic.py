"""Synthetic defects planted into normal texture images, with exact pixel masks.

Used to build the embedded test sets and to turn held-out normal images into anomalous validation
images. Every defect is drawn as an opacity map `alpha` (0..1) and a per-pixel `target` appearance;
the result is `alpha * target + (1 - alpha) * image`. Opacities under `ALPHA_CUT` are set to zero, and
the mask is exactly `alpha > 0`, so no pixel outside the mask ever changes (a masked pixel may keep its
value where rounding or clipping undoes a faint change, which makes the mask a tight superset of the
changed pixels). Defects stay `margin = max(2, 8% of the shorter side)` pixels away from the border and
cover `MIN_AREA_FRACTION`..`MAX_AREA_FRACTION` of the image.

Types (all sizes scale with the image, contrasts with the image's own standard deviation):
- scratch: a smooth curved line 2.5-4 px wide at 256², brighter or darker than the surface, tapering at both ends.
- crack: a dark, jagged random-walk line 2-3 px wide at 256², with one or two thinner branches.
- stain: a soft-edged irregular ellipse (2-4 % of the image) of lowered contrast and brightness shifted by
  1.3-2 std (a smear).

Widths and contrasts were raised in issue 28 so every type is visible at 1× on the three embedded photos
(`python -m texad.tools.defect_visibility`, `python -m texad.tools.contact_sheet --defects`).
- hole: a dark irregular blob, darkest in its centre, ringed by a bright rim.
- foreign: an irregular patch of the image's own texture magnified 2-3x, turned 90 degrees and given
  another mean (0.6-1 std away) and contrast, i.e. a coarser, differently oriented material with a hard
  outline.

Validation-only generators (`VALIDATION_ONLY`), different in kind from every test family above, so
validation does not reward a method for knowing the test defects (the embedded test sets are made
of the five families above; real data sets have their own):
- perlin (DRAEM-style, Zavrtanik et al. 2021): a region cut from thresholded Perlin noise, filled
  with a foreign noise texture (its own scale, colour and contrast) blended in with opacity 0.5-0.9.
- cutpaste (CutPaste, Li et al. 2021): a rectangle of the image's own texture cut from one place,
  flipped, jittered in brightness and contrast, and pasted at another place (hard edges).
"""

from __future__ import annotations

import cv2
import numpy as np

from texad.errors import TexadError

DEFECT_TYPES = ("scratch", "crack", "stain", "hole", "foreign")
VALIDATION_ONLY = ("perlin", "cutpaste")
#: every generator plant_defect knows; validation uses all of them by default (dataset.val_defects)
ALL_GENERATORS = DEFECT_TYPES + VALIDATION_ONLY
MIN_AREA_FRACTION = 0.003
MAX_AREA_FRACTION = 0.05
MIN_IMAGE_SIDE = 32
ALPHA_CUT = 0.05
MIN_CONTRAST = 8.0  # grey levels; keeps defects visible on flat images whose std is near zero
SUPERSAMPLE = 4  # lines are drawn this many times larger, then averaged down, for anti-aliasing
MAX_ATTEMPTS = 64


def plant_defect(
    image: np.ndarray, defect_type: str, rng: np.random.Generator, painters: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A copy of `image` (uint8, (H,W) or (H,W,C)) with one defect, and its bool (H,W) mask.

    Shapes whose area falls outside the allowed fraction are redrawn, so the result depends only on
    `rng`'s state: the same generator state gives the same defect. `painters` (name → painter of a
    `Surface` returning layers) replaces this module's generators (`texad.data.type_families`).
    """
    painters = _PAINTERS if painters is None else painters
    if defect_type not in painters:
        raise TexadError(f"unknown defect type {defect_type!r}; choose one of {', '.join(painters)}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise TexadError(f"plant_defect needs a uint8 (H,W) or (H,W,C) image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise TexadError(f"plant_defect needs images of at least {MIN_IMAGE_SIDE} px a side, got {height}x{width}")
    pixels = image.reshape(height, width, -1).astype(np.float32)
    mean = pixels.mean(axis=(0, 1))
    std = np.maximum(pixels.std(axis=(0, 1)), MIN_CONTRAST)
    surface = Surface(pixels, mean, std, rng)
    for _ in range(MAX_ATTEMPTS):
        layers = painters[defect_type](surface)
        out, mask = composite(pixels, layers)
        fraction = mask.mean()
        if MIN_AREA_FRACTION <= fraction <= MAX_AREA_FRACTION and (out != image.reshape(out.shape)).any():
            return out.reshape(image.shape), mask
    raise TexadError(  # not reached for images >= MIN_IMAGE_SIDE; kept so a bad change fails loudly
        f"could not place a {defect_type!r} defect covering {MIN_AREA_FRACTION:.1%}-{MAX_AREA_FRACTION:.0%} "
        f"of a {height}x{width} image"
    )


class Surface:
    """The image being defected, its statistics and the shared random generator."""

    def __init__(self, pixels: np.ndarray, mean: np.ndarray, std: np.ndarray, rng: np.random.Generator):
        self.pixels, self.mean, self.std, self.rng = pixels, mean, std, rng
        self.height, self.width = pixels.shape[:2]
        self.side = min(self.height, self.width)
        self.area = self.height * self.width
        self.margin = max(2, round(0.08 * self.side))


Layer = tuple[np.ndarray, np.ndarray]  # (alpha (H,W), target (H,W,C)); painted in order


def composite(pixels: np.ndarray, layers: list[Layer]) -> tuple[np.ndarray, np.ndarray]:
    out = pixels.copy()
    mask = np.zeros(pixels.shape[:2], bool)
    for alpha, target in layers:
        alpha = np.where(alpha < ALPHA_CUT, 0.0, np.minimum(alpha, 1.0)).astype(np.float32)
        out = out + alpha[..., None] * (target - out)
        mask |= alpha > 0
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    original = pixels.astype(np.uint8)
    return np.where(mask[..., None], out, original), mask


def centre_for(surface: Surface, half_h: float, half_w: float) -> tuple[float, float]:
    """A random centre keeping a shape of the given half extents inside the border margin."""
    lo_y, hi_y = surface.margin + half_h, surface.height - 1 - surface.margin - half_h
    lo_x, hi_x = surface.margin + half_w, surface.width - 1 - surface.margin - half_w
    cy = surface.rng.uniform(lo_y, hi_y) if hi_y > lo_y else surface.height / 2 - 0.5
    cx = surface.rng.uniform(lo_x, hi_x) if hi_x > lo_x else surface.width / 2 - 0.5
    return cy, cx


def blob_distance(
    surface: Surface, radius_y: float, radius_x: float, wobble: float, harmonics: int, extent: float = 1.05
):
    """Normalised distance (1 on the outline) of an irregular rotated ellipse placed inside the margin.

    The outline radius is modulated by low angular harmonics so blobs are not perfect ellipses;
    `extent` is how far (in outline units) the painter draws beyond the outline, e.g. a rim. The second
    value is the outline's mean radius in pixels, for converting pixel widths to distance.
    """
    rng = surface.rng
    amplitudes = [rng.uniform(0, wobble / np.sqrt(k - 1)) for k in range(2, 2 + harmonics)]
    phases = [rng.uniform(0, 2 * np.pi) for _ in amplitudes]
    reach = max(radius_y, radius_x) * (1 + sum(amplitudes)) * extent
    cy, cx = centre_for(surface, reach, reach)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0 : surface.height, 0 : surface.width].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    theta = np.arctan2(v, u)
    modulation = np.ones_like(theta)
    for k, (amplitude, phase) in enumerate(zip(amplitudes, phases), start=2):
        modulation += amplitude * np.cos(k * theta + phase)
    distance = np.sqrt((u / radius_x) ** 2 + (v / radius_y) ** 2) / np.maximum(modulation, 0.3)
    return distance, float(np.sqrt(radius_y * radius_x))


def ellipse_radii(surface: Surface, area_fraction: float, max_aspect: float) -> tuple[float, float]:
    aspect = surface.rng.uniform(1.0, max_aspect)
    mean_radius = np.sqrt(area_fraction * surface.area / np.pi)
    return mean_radius * np.sqrt(aspect), mean_radius / np.sqrt(aspect)


def draw_polylines(surface: Surface, strokes: list[tuple[np.ndarray, float, float]]) -> np.ndarray:
    """Anti-aliased opacity of polylines given as (points (N,2) xy, width px, opacity)."""
    k = SUPERSAMPLE
    alpha = np.zeros((surface.height, surface.width), np.float32)
    for points, width, opacity in strokes:
        canvas = np.zeros((surface.height * k, surface.width * k), np.uint8)
        pts = np.round(points * k + (k - 1) / 2).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(canvas, [pts], False, 255, thickness=max(1, round(width * k)), lineType=cv2.LINE_AA)
        small = cv2.resize(canvas, (surface.width, surface.height), interpolation=cv2.INTER_AREA)
        alpha = np.maximum(alpha, small.astype(np.float32) / 255.0 * opacity)
    return alpha


def fit_inside(surface: Surface, points: np.ndarray) -> np.ndarray:
    """Shift a path (xy, around the origin) to a random spot with its box inside the margin."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    half = (hi - lo) / 2
    cy, cx = centre_for(surface, float(half[1]) + 2, float(half[0]) + 2)
    return points - (lo + hi) / 2 + np.array([cx, cy])


def _paint_scratch(surface: Surface) -> list[Layer]:
    rng, side = surface.rng, surface.side
    length = side * rng.uniform(0.2, 0.55)
    width = max(1.0, side / 256 * rng.uniform(2.5, 4.0))  # issue 28: 1.5-2.5 px hid among gravel's twigs
    theta = rng.uniform(0, np.pi)
    bend = rng.uniform(-0.3, 0.3) * length
    t = np.linspace(0, 1, 96)[:, None]
    start = np.array([0.0, 0.0])
    end = length * np.array([np.cos(theta), np.sin(theta)])
    control = (start + end) / 2 + bend * np.array([-np.sin(theta), np.cos(theta)])
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end  # quadratic Bezier
    curve = fit_inside(surface, curve)
    # Taper: the middle 70 % at full width, the ends thinner and fainter.
    strokes = [
        (curve[12:84], width, 1.0),
        (curve[4:92], max(1.0, width * 0.6), 0.7),
        (curve, 1.0, 0.45),
    ]
    alpha = draw_polylines(surface, strokes) * rng.uniform(0.75, 1.0)
    sign = 1.0 if rng.random() < 0.6 else -1.0
    target = surface.pixels + sign * rng.uniform(1.6, 2.4) * surface.std
    return [(alpha, target)]


def _paint_crack(surface: Surface) -> list[Layer]:
    rng, side = surface.rng, surface.side
    step = max(1.0, side / 96)

    def walk(start: np.ndarray, heading: float, length: float) -> np.ndarray:
        points, direction = [start], heading
        for _ in range(max(3, int(length / step))):
            direction = heading + 0.6 * (direction - heading) + rng.normal(0, 0.55)
            points.append(points[-1] + step * rng.uniform(0.7, 1.3) * np.array([np.cos(direction), np.sin(direction)]))
        return np.array(points)

    heading = rng.uniform(0, 2 * np.pi)
    trunk = walk(np.zeros(2), heading, side * rng.uniform(0.25, 0.45))
    branches = []
    for _ in range(rng.integers(1, 3)):
        at = trunk[rng.integers(len(trunk) // 4, 3 * len(trunk) // 4)]
        turn = rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
        branches.append(walk(at, heading + turn, side * rng.uniform(0.07, 0.16)))
    offset = fit_inside(surface, np.vstack([trunk, *branches]))[0] - trunk[0]
    width = max(1.0, side / 256 * rng.uniform(2.0, 3.0))  # issue 28: 1.2-2.0 px was a hairline at 1x
    strokes = [(trunk + offset, width, 1.0)] + [(b + offset, max(1.0, width * 0.6), 0.85) for b in branches]
    alpha = draw_polylines(surface, strokes)
    target = surface.pixels * rng.uniform(0.2, 0.4)
    return [(alpha, target)]


def _paint_stain(surface: Surface) -> list[Layer]:
    rng = surface.rng
    ry, rx = ellipse_radii(surface, rng.uniform(0.02, 0.04), max_aspect=2.2)  # wider than a stone of gravel
    distance, _ = blob_distance(surface, ry, rx, wobble=0.12, harmonics=3)
    ramp = np.clip((1 - distance) / 0.35, 0, 1)  # soft edge over the outer third of the radius
    alpha = ramp * ramp * (3 - 2 * ramp) * rng.uniform(0.85, 1.0)
    # issue 28: gain 0.3-0.6 and a shift of 0.6-1.1 std, mostly darker, read as a shadow on gravel and grass
    gain = rng.uniform(0.15, 0.4)
    shift = (1.0 if rng.random() < 0.5 else -1.0) * rng.uniform(1.3, 2.0) * surface.std
    target = surface.mean + (surface.pixels - surface.mean) * gain + shift
    return [(alpha, target)]


def _paint_hole(surface: Surface) -> list[Layer]:
    rng = surface.rng
    ry, rx = ellipse_radii(surface, rng.uniform(0.003, 0.01), max_aspect=1.5)
    radius = float(np.sqrt(ry * rx))
    edge = 1.0 / max(radius, 1.0)  # one-pixel anti-aliased edge, in outline units
    rim_width = max(1.5 / max(radius, 1.0), 0.3)
    distance, _ = blob_distance(surface, ry, rx, wobble=0.15, harmonics=4, extent=1 + rim_width + 2 * edge)
    inner = np.clip((1 - distance) / edge + 0.5, 0, 1)
    rim = np.clip(1 - np.abs(distance - 1 - rim_width / 2) / (rim_width / 2 + edge), 0, 1) * rng.uniform(0.6, 0.9)
    dark = surface.mean * rng.uniform(0.25, 0.45)
    depth = np.clip(distance, 0, 1)[..., None]
    inner_target = dark * (0.6 + 0.4 * depth) + 0.3 * (surface.pixels - surface.mean)  # darkest at the centre
    rim_target = surface.pixels + rng.uniform(0.8, 1.3) * surface.std
    return [(rim, rim_target), (inner, inner_target)]


def _paint_foreign(surface: Surface) -> list[Layer]:
    rng = surface.rng
    ry, rx = ellipse_radii(surface, rng.uniform(0.012, 0.035), max_aspect=1.8)
    distance, radius = blob_distance(surface, ry, rx, wobble=0.3, harmonics=6)
    alpha = np.clip((1 - distance) * radius / 1.5 + 0.5, 0, 1)
    # The patch's texture: a small region of the image magnified and turned by 90 degrees.
    zoom = rng.uniform(2.0, 3.0)
    src = max(4, int(np.ceil(surface.side / zoom)))
    y0 = rng.integers(0, surface.height - src + 1)
    x0 = rng.integers(0, surface.width - src + 1)
    region = np.ascontiguousarray(np.rot90(surface.pixels[y0 : y0 + src, x0 : x0 + src], k=rng.choice([1, 3])))
    material = cv2.resize(region, (surface.width, surface.height), interpolation=cv2.INTER_CUBIC)
    material = material.reshape(surface.pixels.shape)
    inside = alpha > 0.5
    m_mean = material[inside].mean(axis=0) if inside.any() else surface.mean
    m_std = np.maximum(material[inside].std(axis=0), 1.0) if inside.any() else surface.std
    # issue 28: a shift of 0.3-0.7 std let a patch pass for mortar or a brick (visibility 0.23 on brick)
    new_mean = surface.mean + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.0) * surface.std
    new_std = surface.std * rng.uniform(0.5, 0.8)
    target = (material - m_mean) / m_std * new_std + new_mean
    return [(alpha, target)]


def perlin_noise(height: int, width: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise (values in about [-0.7, 0.7]) with `cells` lattice cells on the shorter side."""
    step = min(height, width) / cells
    gy, gx = int(np.ceil(height / step)) + 1, int(np.ceil(width / step)) + 1
    angles = rng.uniform(0, 2 * np.pi, size=(gy + 1, gx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) / step
    y0, x0 = np.floor(yy).astype(int), np.floor(xx).astype(int)
    fy, fx = yy - y0, xx - x0

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grad[y0 + dy, x0 + dx]
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) + ux * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + ux * (corner(1, 1) - corner(1, 0))
    return top + uy * (bottom - top)


def _paint_perlin(surface: Surface) -> list[Layer]:
    rng, h, w, m = surface.rng, surface.height, surface.width, surface.margin
    noise = perlin_noise(h, w, int(rng.choice([2, 4, 8])), rng)
    inside = np.zeros((h, w), bool)
    inside[m : h - m, m : w - m] = True
    fraction = rng.uniform(0.01, 0.04)
    threshold = np.quantile(noise[inside], 1 - fraction * surface.area / inside.sum())
    region = (noise > threshold) & inside
    # the filling: a foreign noise texture at its own scale, with its own mean and contrast
    fill = perlin_noise(h, w, int(rng.choice([8, 16, 32])), rng) + 0.5 * perlin_noise(h, w, 32, rng)
    fill = (fill - fill.mean()) / max(fill.std(), 1e-6)
    channels = surface.pixels.shape[2]
    tint = rng.uniform(-1.5, 1.5, size=channels) * surface.std
    target = surface.mean + tint + fill[..., None] * surface.std * rng.uniform(0.8, 1.6)
    alpha = region.astype(np.float32) * rng.uniform(0.5, 0.9)
    return [(alpha, target)]


def _paint_cutpaste(surface: Surface) -> list[Layer]:
    rng, h, w = surface.rng, surface.height, surface.width
    area = rng.uniform(0.01, 0.04) * surface.area
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
    ph = int(np.clip(round(np.sqrt(area * aspect)), 2, h - 2 * surface.margin - 2))
    pw = int(np.clip(round(area / ph), 2, w - 2 * surface.margin - 2))
    sy, sx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    patch = surface.pixels[sy : sy + ph, sx : sx + pw].copy()
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1]
    p_mean = patch.mean(axis=(0, 1))
    gain = rng.uniform(0.7, 1.3)
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.6) * surface.std
    patch = (patch - p_mean) * gain + p_mean + shift
    cy, cx = centre_for(surface, ph / 2, pw / 2)
    y0, x0 = int(round(cy - ph / 2)), int(round(cx - pw / 2))
    y0, x0 = int(np.clip(y0, 0, h - ph)), int(np.clip(x0, 0, w - pw))
    alpha = np.zeros((h, w), np.float32)
    alpha[y0 : y0 + ph, x0 : x0 + pw] = 1.0
    target = surface.pixels.copy()
    target[y0 : y0 + ph, x0 : x0 + pw] = patch
    return [(alpha, target)]


_PAINTERS = {
    "scratch": _paint_scratch,
    "crack": _paint_crack,
    "stain": _paint_stain,
    "hole": _paint_hole,
    "foreign": _paint_foreign,
    "perlin": _paint_perlin,
    "cutpaste": _paint_cutpaste,
}
