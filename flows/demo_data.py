"""A small synthetic multi-class anomaly dataset in MVTec-AD layout, for a demo with no download.

Layout written by `generate_demo_dataset`::

    <root>/<dataset>/<category>/train/good/NNN.png
    <root>/<dataset>/<category>/test/good/NNN.png
    <root>/<dataset>/<category>/test/<defect>/NNN.png
    <root>/<dataset>/<category>/ground_truth/<defect>/NNN_mask.png   (mode L, 0/255)
    <root>/<dataset>/.complete                                      (JSON, written last)

Each category is one appearance family ("weave" is a texture, "washer" and "bracket" are objects);
normal images vary in pose, lighting, colour and noise. `render` draws the normal scene first and
the defect after it, so one generator state gives the same normal image with or without a defect.
A defect is painted from one boolean shape and only inside it, and that shape is the mask: the
image with a defect differs from the clean one exactly on the mask pixels.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

# Bump when rendering changes, so that demo sets written by an older version are regenerated.
GENERATOR_VERSION = 1
MARKER = ".complete"

CATEGORIES: tuple[str, ...] = ("weave", "washer", "bracket")
DEFECTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "weave": ("hole", "contamination"),
    "washer": ("scratch", "crack"),
    "bracket": ("missing", "spot"),
})
# Bounds on a defect's area as a fraction of the image; shapes outside are redrawn.
MIN_DEFECT_FRACTION = 0.003
MAX_DEFECT_FRACTION = 0.05
MIN_IMAGE_SIZE = 64
_MAX_DEFECT_TRIES = 200


@dataclass(frozen=True)
class DemoSpec:
    """Size of the demo set: image side in pixels and image counts per category."""

    image_size: int = 224
    train_per_category: int = 16
    test_good_per_category: int = 6
    test_defect_per_type: int = 4  # defect images per defect type per category

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"DemoSpec.image_size={self.image_size!r}: use an int >= {MIN_IMAGE_SIZE}")
        if not isinstance(self.train_per_category, int) or self.train_per_category < 1:
            raise ValueError(f"DemoSpec.train_per_category={self.train_per_category!r}: use an int >= 1")
        for name in ("test_good_per_category", "test_defect_per_type"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"DemoSpec.{name}={value!r}: use an int >= 0")


@dataclass(frozen=True)
class DemoSummary:
    """What `generate_demo_dataset` wrote (or found complete): pass ``root / dataset`` to discovery."""

    root: Path
    dataset: str
    categories: tuple[str, ...]
    num_train: int
    num_test: int
    num_masks: int

    @property
    def path(self) -> Path:
        return self.root / self.dataset


class Rendering(NamedTuple):
    """One rendered sample: image uint8 [S, S, 3] and defect mask bool [S, S] (all False if normal)."""

    image: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class _Scene:
    """A normal scene before lighting and noise; defects edit ``colour`` inside a shape."""

    colour: np.ndarray  # [S, S, 3] float, object composited over background
    background: np.ndarray  # [S, S, 3] float, what shows where the object is absent
    coverage: np.ndarray  # [S, S] float in [0, 1], object alpha (1 everywhere for a texture)
    part: np.ndarray  # [S, S] bool, where a defect may be centred / drawn
    light: np.ndarray  # [S, S] float, multiplicative illumination


# ----------------------------------------------------------------------------------------- geometry

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each [S, S] float."""
    c = np.arange(size, dtype=np.float64) + 0.5
    return c[:, None] * np.ones((1, size)), np.ones((size, 1)) * c[None, :]


def _alpha(sdf: np.ndarray) -> np.ndarray:
    """Coverage from a signed distance in pixels (negative inside), one-pixel antialiased edge."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _box_sdf(px: np.ndarray, py: np.ndarray, hx: float, hy: float, radius: float) -> np.ndarray:
    """Signed distance to a rounded box of half sizes (hx, hy) centred at the origin."""
    qx = np.abs(px) - (hx - radius)
    qy = np.abs(py) - (hy - radius)
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0) - radius


def _bevel(sdf: np.ndarray, light_angle: float, width: float) -> np.ndarray:
    """Edge shading in [-1, 1]: rims facing the light are bright, rims facing away are dark."""
    gy, gx = np.gradient(sdf)
    norm = np.hypot(gx, gy) + 1e-9
    facing = (gx * np.cos(light_angle) + gy * np.sin(light_angle)) / norm
    return facing * np.exp(-np.maximum(-sdf, 0.0) / width) * (sdf < 0.5)


def _lighting(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    """A linear gradient in a random direction with a soft vignette, times a global gain."""
    angle = rng.uniform(0.0, 2 * np.pi)
    strength = rng.uniform(0.10, 0.30)
    gain = rng.uniform(0.92, 1.06)
    u = ((x - size / 2) * np.cos(angle) + (y - size / 2) * np.sin(angle)) / size
    r2 = ((x - size / 2) ** 2 + (y - size / 2) ** 2) / size**2
    return gain * (1.0 + strength * u) * (1.0 - rng.uniform(0.05, 0.2) * r2)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian noise blurred with ``sigma`` pixels, [S, S]."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return field / (field.std() + 1e-9)


def _shadow(background: np.ndarray, coverage: np.ndarray, size: int,
            rng: np.random.Generator) -> np.ndarray:
    """Background darkened by a soft, offset drop shadow of the object."""
    s = size / 224
    shift = rng.uniform(2.0, 5.0, 2) * s
    cast = ndimage.gaussian_filter(ndimage.shift(coverage, shift, order=1), 4.0 * s)
    return background * (1.0 - rng.uniform(0.3, 0.5) * cast)[..., None]


# ---------------------------------------------------------------------------------- normal scenes

def _weave(rng: np.random.Generator, size: int) -> _Scene:
    """Plain-weave fabric: over/under threads with per-thread shade, random pitch, angle and phase."""
    y, x = _grid(size)
    s = size / 224
    pitch = rng.uniform(12.5, 15.5) * s
    angle = rng.normal(0.0, 0.03)
    phase = rng.uniform(0.0, 2.0, 2)
    contrast = rng.uniform(0.75, 1.0)
    weft = np.array([0.80, 0.69, 0.50]) * rng.uniform(0.93, 1.05) + rng.normal(0.0, 0.015, 3)
    warp = weft * rng.uniform(0.86, 0.96) + rng.normal(0.0, 0.01, 3)
    weft_shade = 1.0 + rng.normal(0.0, 0.05, 64)
    warp_shade = 1.0 + rng.normal(0.0, 0.05, 64)
    u = (x * np.cos(angle) + y * np.sin(angle)) / pitch + phase[0]
    v = (-x * np.sin(angle) + y * np.cos(angle)) / pitch + phase[1]
    cu, cv = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - cu, v - cv
    weft_on_top = (cu + cv) % 2 == 0
    body_h = np.sin(np.pi * fv) ** 0.6 * (0.72 + 0.28 * np.sin(np.pi * fu)) * weft_shade[cv % 64]
    body_v = np.sin(np.pi * fu) ** 0.6 * (0.72 + 0.28 * np.sin(np.pi * fv)) * warp_shade[cu % 64]
    body = np.where(weft_on_top, body_h, body_v)
    fibre = 1.0 + 0.05 * _smooth_noise(rng, size, 0.8) + 0.04 * _smooth_noise(rng, size, 12.0 * s)
    lum = (1.0 - contrast * (1.0 - (0.3 + 0.7 * body))) * fibre
    tone = np.where(weft_on_top[..., None], weft, warp)
    colour = tone * lum[..., None]
    margin = int(round(0.06 * size))
    part = np.zeros((size, size), dtype=bool)
    part[margin:-margin, margin:-margin] = True
    backing = np.broadcast_to(weft * 0.1, colour.shape)
    return _Scene(colour, backing, np.ones((size, size)), part, _lighting(rng, y, x, size))


def _washer(rng: np.random.Generator, size: int) -> _Scene:
    """A brushed-metal tab washer, centred with jitter, on a dark slate background."""
    y, x = _grid(size)
    s = size / 224
    cx, cy = size / 2 + np.clip(rng.normal(0.0, 0.015 * size, 2), -0.04 * size, 0.04 * size)
    r_out = rng.uniform(0.33, 0.36) * size
    r_in = r_out * rng.uniform(0.40, 0.45)
    rot = np.pi / 2 + rng.uniform(-0.3, 0.3)
    dx, dy = x - cx, y - cy
    r = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    ring = np.maximum(r - r_out, r_in - r)
    tab_depth, tab_half = 0.06 * size, 0.035 * size
    tx = dx * np.cos(rot) + dy * np.sin(rot)
    ty = -dx * np.sin(rot) + dy * np.cos(rot)
    tab = _box_sdf(tx - (r_in - tab_depth / 2 + 2 * s), ty, tab_depth / 2 + 2 * s, tab_half, 1.5 * s)
    sdf = np.minimum(ring, tab)
    coverage = _alpha(sdf)
    light_angle = rng.uniform(0.0, 2 * np.pi)
    lum = (0.55 + rng.uniform(0.15, 0.25) * np.cos(2 * (phi - light_angle))
           + 0.03 * np.sin(2 * np.pi * r / (2.1 * s) + rng.uniform(0, 2 * np.pi))
           + 0.03 * _smooth_noise(rng, size, 1.0)
           + 0.16 * _bevel(sdf, light_angle, 2.5 * s))
    metal = np.array([1.0, 0.985, 0.955]) + rng.normal(0.0, 0.01, 3)
    obj = lum[..., None] * metal
    slate = np.array([0.20, 0.22, 0.25]) * rng.uniform(0.9, 1.1)
    bg = slate * (1.0 + 0.04 * _smooth_noise(rng, size, 6.0 * s))[..., None]
    bg = _shadow(bg, coverage, size, rng)
    colour = bg * (1 - coverage[..., None]) + obj * coverage[..., None]
    return _Scene(colour, bg, coverage, coverage >= 0.999, _lighting(rng, y, x, size))


def _bracket(rng: np.random.Generator, size: int) -> _Scene:
    """A painted plate with four holes and a slot, slightly rotated and shifted, on light grey."""
    y, x = _grid(size)
    s = size / 224
    cx, cy = size / 2 + np.clip(rng.normal(0.0, 0.02 * size, 2), -0.05 * size, 0.05 * size)
    rot = rng.uniform(-0.1, 0.1)
    hx, hy = np.array([0.36, 0.22]) * size * rng.uniform(0.97, 1.03, 2)
    px = (x - cx) * np.cos(rot) + (y - cy) * np.sin(rot)
    py = -(x - cx) * np.sin(rot) + (y - cy) * np.cos(rot)
    plate = _box_sdf(px, py, hx, hy, 0.05 * size)
    hole_r = rng.uniform(0.032, 0.04) * size
    holes = np.full_like(px, np.inf)
    for sx in (-1, 1):
        for sy in (-1, 1):
            hcx, hcy = sx * (hx - 0.09 * size), sy * (hy - 0.08 * size)
            holes = np.minimum(holes, np.hypot(px - hcx, py - hcy) - hole_r)
    slot_len, slot_r = 0.08 * size, 0.03 * size
    holes = np.minimum(holes, np.hypot(np.maximum(np.abs(px) - slot_len, 0.0), py) - slot_r)
    sdf = np.maximum(plate, -holes)
    coverage = _alpha(sdf)
    light_angle = rng.uniform(0.0, 2 * np.pi)
    paint = np.array([0.86, 0.58, 0.16]) * rng.uniform(0.93, 1.05) + rng.normal(0.0, 0.015, 3)
    countersink = np.exp(-((holes - 3.0 * s) / (2.0 * s)) ** 2)
    lum = (1.0 + 0.035 * _smooth_noise(rng, size, 1.5 * s)
           + 0.25 * _bevel(sdf, light_angle, 2.0 * s) - 0.12 * countersink)
    obj = paint * lum[..., None]
    grey = np.array([0.80, 0.80, 0.78]) * rng.uniform(0.93, 1.04)
    bg = grey * (1.0 + 0.025 * _smooth_noise(rng, size, 3.0 * s))[..., None]
    bg = _shadow(bg, coverage, size, rng)
    colour = bg * (1 - coverage[..., None]) + obj * coverage[..., None]
    return _Scene(colour, bg, coverage, coverage >= 0.999, _lighting(rng, y, x, size))


_SCENES: Mapping[str, Callable[[np.random.Generator, int], _Scene]] = MappingProxyType({
    "weave": _weave,
    "washer": _washer,
    "bracket": _bracket,
})


# ------------------------------------------------------------------------------------------ defects

def _point_on(region: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A uniformly chosen pixel centre (x, y) of a non-empty bool region [S, S]."""
    idx = np.flatnonzero(region)
    assert idx.size > 0, "defect placement region is empty"
    yy, xx = divmod(int(idx[rng.integers(idx.size)]), region.shape[1])
    return xx + 0.5, yy + 0.5


def _polyline(points: np.ndarray, width: float, size: int) -> np.ndarray:
    """Pixels within width/2 of a polyline given as [N, 2] (x, y) points, bool [S, S]."""
    y, x = _grid(size)
    dist = np.full((size, size), np.inf)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
        dist = np.minimum(dist, np.hypot(x - (x0 + t * dx), y - (y0 + t * dy)))
    return dist <= width / 2


def _blob(rng: np.random.Generator, centre: tuple[float, float], radius: float, size: int,
          elongation: float = 1.6, roughness: float = 0.18) -> np.ndarray:
    """An irregular ellipse: radius modulated by three random harmonics of the angle, bool [S, S]."""
    y, x = _grid(size)
    angle = rng.uniform(0.0, np.pi)
    stretch = rng.uniform(1.0, elongation)
    dx, dy = x - centre[0], y - centre[1]
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / stretch
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    theta = np.arctan2(v, u)
    edge = np.ones_like(theta)
    for k in (2, 3, 5):
        edge += rng.uniform(0.0, roughness) / k * 2 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) < radius * edge


def _within(shape: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``shape`` if it lies inside ``region``, else an empty shape (so `render` draws another)."""
    return shape if not (shape & ~region).any() else np.zeros_like(shape)


def _hole(scene: _Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A dark irregular hole through the fabric, darker towards its centre."""
    shape = _within(_blob(rng, _point_on(scene.part, rng), rng.uniform(0.03, 0.07) * size, size),
                    scene.part)
    depth = ndimage.distance_transform_edt(shape)
    dark = np.array([0.07, 0.055, 0.045]) * (1.0 - 0.5 * np.clip(depth / (0.02 * size), 0, 1))[..., None]
    return shape, np.broadcast_to(dark, scene.colour.shape)


def _contamination(scene: _Scene, rng: np.random.Generator,
                   size: int) -> tuple[np.ndarray, np.ndarray]:
    """A translucent stain of a foreign colour (rust, ink or dye) over the surface."""
    palette = np.array([[0.50, 0.16, 0.06], [0.10, 0.20, 0.58], [0.15, 0.40, 0.12]])
    tint = palette[rng.integers(len(palette))]
    shape = _blob(rng, _point_on(scene.part, rng), rng.uniform(0.04, 0.085) * size, size,
                  elongation=2.2, roughness=0.25)
    shape = _within(shape, scene.part)
    opacity = rng.uniform(0.65, 0.85)
    return shape, scene.colour * (1 - opacity) + tint * opacity


def _scratch(scene: _Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A slightly bent line segment, dark (a groove) on bright metal and bright on dull metal."""
    start = np.array(_point_on(scene.part, rng))
    heading = rng.uniform(0.0, 2 * np.pi)
    length = rng.uniform(0.15, 0.35) * size
    bend = rng.normal(0.0, 0.25)
    mid = start + length / 2 * np.array([np.cos(heading), np.sin(heading)])
    end = mid + length / 2 * np.array([np.cos(heading + bend), np.sin(heading + bend)])
    shape = _polyline(np.stack([start, mid, end]), max(3.0, 4.0 * size / 224), size) & scene.part
    if not shape.any():
        return shape, scene.colour
    if np.median(scene.colour[shape].mean(axis=1)) > 0.6:
        return shape, scene.colour * 0.3
    return shape, scene.colour + (1.0 - scene.colour) * 0.75


def _crack(scene: _Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A dark jagged random-walk line with one branch."""
    step = 4.0 * size / 224
    n = int(rng.integers(12, 22))
    heading = rng.uniform(0.0, 2 * np.pi)
    turns = heading + np.cumsum(rng.normal(0.0, 0.45, n))
    start = np.array(_point_on(scene.part, rng))
    main = start + np.concatenate([[[0.0, 0.0]], np.cumsum(
        step * np.stack([np.cos(turns), np.sin(turns)], axis=1), axis=0)])
    at = int(rng.integers(2, n - 2))
    b_turns = turns[at] + rng.choice([-1.0, 1.0]) * 0.8 + np.cumsum(rng.normal(0.0, 0.45, n // 3))
    branch = main[at] + np.concatenate([[[0.0, 0.0]], np.cumsum(
        step * np.stack([np.cos(b_turns), np.sin(b_turns)], axis=1), axis=0)])
    width = max(3.0, 3.2 * size / 224)
    shape = (_polyline(main, width, size) | _polyline(branch, width, size)) & scene.part
    return shape, scene.colour * 0.15


def _missing(scene: _Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A chunk bitten out of the part's outline: the background shows where the part was."""
    solid = ndimage.binary_fill_holes(scene.coverage >= 0.5)
    rim = solid & ~ndimage.binary_erosion(solid)
    shape = _blob(rng, _point_on(rim, rng), rng.uniform(0.06, 0.1) * size, size, roughness=0.3)
    shape &= scene.coverage > 0.02
    return shape, scene.background


def _spot(scene: _Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A dark oily blot on the part."""
    shape = _within(_blob(rng, _point_on(scene.part, rng), rng.uniform(0.03, 0.06) * size, size),
                    scene.part)
    opacity = rng.uniform(0.8, 0.92)
    return shape, scene.colour * (1 - opacity) + np.array([0.10, 0.08, 0.06]) * opacity


_DefectFn = Callable[[_Scene, np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
_DEFECT_FNS: Mapping[str, _DefectFn] = MappingProxyType({
    "hole": _hole,
    "contamination": _contamination,
    "scratch": _scratch,
    "crack": _crack,
    "missing": _missing,
    "spot": _spot,
})


# ------------------------------------------------------------------------------------------- render

def render(category: str, rng: np.random.Generator, defect: str | None = None,
           image_size: int = 224) -> Rendering:
    """Render one image of ``category``, normal when ``defect`` is None.

    Draws from ``rng`` in a fixed order (scene, sensor noise, then the defect), so two generators in
    the same state give the same normal image, and the defect version differs from it only on the
    returned mask. Defect shapes whose area is outside [MIN_DEFECT_FRACTION, MAX_DEFECT_FRACTION]
    of the image are redrawn. Returns image uint8 [S, S, 3] and mask bool [S, S].
    """
    if category not in _SCENES:
        raise ValueError(f"unknown demo category {category!r}; choose one of {CATEGORIES}")
    if defect is not None and defect not in DEFECTS[category]:
        raise ValueError(f"category {category!r} has no defect {defect!r}; choose one of "
                         f"{DEFECTS[category]} or None")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size!r}: use an int >= {MIN_IMAGE_SIZE}")
    scene = _SCENES[category](rng, image_size)
    noise = rng.normal(0.0, rng.uniform(0.008, 0.018), (image_size, image_size, 3))
    colour = scene.colour
    mask = np.zeros((image_size, image_size), dtype=bool)
    if defect is not None:
        for _ in range(_MAX_DEFECT_TRIES):
            shape, painted = _DEFECT_FNS[defect](scene, rng, image_size)
            if MIN_DEFECT_FRACTION <= shape.mean() <= MAX_DEFECT_FRACTION:
                break
        else:
            raise RuntimeError(f"could not draw a {defect!r} defect of allowed area on {category!r} "
                               f"in {_MAX_DEFECT_TRIES} tries (image_size={image_size})")
        mask = shape
        colour = np.where(mask[..., None], painted, colour)
    image = np.clip(colour * scene.light[..., None] + noise, 0.0, 1.0)
    return Rendering(np.rint(image * 255.0).astype(np.uint8), mask)


# ------------------------------------------------------------------------------------------ dataset

def _sample_rng(seed: int, category: str, split: str, defect: str, index: int) -> np.random.Generator:
    """The generator of one file; independent of which other categories or counts are generated."""
    key = [zlib.crc32(part.encode()) for part in (category, split, defect)]
    return np.random.default_rng(np.random.SeedSequence([seed, *key, index]))


def _planned_files(spec: DemoSpec) -> list[tuple[str, str, str, int]]:
    """(category, split, type, index) of every image, in writing order."""
    plan: list[tuple[str, str, str, int]] = []
    for category in CATEGORIES:
        plan += [(category, "train", "good", i) for i in range(spec.train_per_category)]
        plan += [(category, "test", "good", i) for i in range(spec.test_good_per_category)]
        for defect in DEFECTS[category]:
            plan += [(category, "test", defect, i) for i in range(spec.test_defect_per_type)]
    return plan


def _marker_content(spec: DemoSpec, seed: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "spec": asdict(spec),
        "categories": list(CATEGORIES),
        "defects": {c: list(DEFECTS[c]) for c in CATEGORIES},
    }


def _is_complete(target: Path, expected: dict) -> bool:
    try:
        return json.loads((target / MARKER).read_text()) == expected
    except (OSError, ValueError):
        return False


def _looks_generated(target: Path) -> bool:
    """True when every file under ``target`` has a name this generator could have written."""
    for path in target.rglob("*"):
        rel = path.relative_to(target).parts
        if path.is_dir():
            if len(rel) > 3:
                return False
        elif path.name != MARKER or len(rel) != 1:
            if len(rel) != 4 or rel[0] not in DEFECTS or rel[1] not in ("train", "test", "ground_truth"):
                return False
            if not (rel[3].endswith(".png") and rel[3][:3].isdigit()):
                return False
    return True


def _write(directory: Path, spec: DemoSpec, seed: int) -> None:
    for category, split, kind, i in _planned_files(spec):
        rng = _sample_rng(seed, category, split, kind, i)
        image, mask = render(category, rng, None if kind == "good" else kind, spec.image_size)
        folder = directory / category / split / kind
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="RGB").save(folder / f"{i:03d}.png", format="PNG")
        if kind != "good":
            gt = directory / category / "ground_truth" / kind
            gt.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(gt / f"{i:03d}_mask.png",
                                                                       format="PNG")


def generate_demo_dataset(root: str | Path, spec: DemoSpec = DemoSpec(), seed: int = 0,
                          dataset: str = "demo") -> DemoSummary:
    """Write the demo set under ``root/dataset`` unless a complete one for this seed and spec is there.

    Same seed and spec give the same bytes. The set is written into a hidden temporary folder under
    ``root`` (nested one level deeper, so dataset discovery never sees it) and renamed into place with
    the ``.complete`` marker already inside, so a half-written set never looks complete. An existing
    ``root/dataset`` without a matching marker is replaced, but only if every file in it has a name
    this generator writes; anything else raises FileExistsError rather than deleting user data.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r}: use a non-negative int")
    seed = int(seed)
    if not dataset or dataset.startswith(".") or Path(dataset).name != dataset or "\\" in dataset:
        raise ValueError(f"dataset={dataset!r}: use a plain folder name (no '/', not starting with '.')")
    root = Path(root)
    target = root / dataset
    expected = _marker_content(spec, seed)
    summary = DemoSummary(
        root=root,
        dataset=dataset,
        categories=CATEGORIES,
        num_train=len(CATEGORIES) * spec.train_per_category,
        num_test=sum(spec.test_good_per_category + len(DEFECTS[c]) * spec.test_defect_per_type
                     for c in CATEGORIES),
        num_masks=sum(len(DEFECTS[c]) * spec.test_defect_per_type for c in CATEGORIES),
    )
    if _is_complete(target, expected):
        return summary
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a folder; pass another root or dataset")
        if not (target / MARKER).exists() and not _looks_generated(target):
            raise FileExistsError(
                f"{target} exists and holds files the demo generator did not write; pass another "
                f"root or dataset name instead of overwriting it")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dataset}.tmp-", dir=root))
    try:
        fresh = staging / dataset
        fresh.mkdir()
        _write(fresh, spec, seed)
        (fresh / MARKER).write_text(json.dumps(expected, sort_keys=True))
        if target.exists():
            target.rename(staging / "old")
        try:
            os.rename(fresh, target)
        except OSError:
            if _is_complete(target, expected):  # another process finished the same set first
                return summary
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary
