"""Pseudo-anomalies for the pseudo-validation set (section 3.4, Figure 4).

A mask is the union of a few randomly rotated shapes (ellipse, rectangle, polygon, scratch). The
fragment of a *source* normal image under that mask is cut out and pasted onto another *target*
normal image at a random offset; the pasted pixels are the anomaly label. Everything is drawn from
an explicit :class:`numpy.random.Generator`; :func:`build_pseudo_anomalies` takes a seed.

Shape size: a shape's *extent* ``s`` (its largest dimension before rotation: the ellipse's major
axis, the rectangle's long side, the polygon's outer diameter, the scratch's path length) is drawn
uniformly in ``size_range * min(H, W)``, at least 2 pixels.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from lafite_core.config import SynthesisConfig

SHAPE_KINDS: tuple[str, ...] = ("ellipse", "rectangle", "polygon", "scratch")
_MAX_ATTEMPTS = 100
_ELLIPSE_VERTICES = 48


@dataclass(frozen=True, eq=False)
class SynthesizedSample:
    """One synthesised anomaly.

    image: uint8 [H, W, 3], the target with the fragment pasted in.
    mask: bool [H, W], exactly the pasted pixels (the anomaly label).
    offset: (dy, dx); for every masked (y, x) the source pixel (y - dy, x - dx) was pasted there.
    target_index, source_index: positions in the lists given to :func:`build_pseudo_anomalies`;
    None when the sample came from :func:`synthesize` directly.
    """

    image: np.ndarray
    mask: np.ndarray
    offset: tuple[int, int]
    target_index: int | None = None
    source_index: int | None = None

    def __post_init__(self) -> None:
        assert self.image.dtype == np.uint8 and self.image.ndim == 3
        assert self.mask.dtype == np.bool_ and self.mask.shape == self.image.shape[:2]


def _shape_vertices(kind: str, extent: float, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Unrotated outline of one shape centred at the origin: float [V, 2] (x, y), line width.

    A line width of 0 means a filled polygon; a positive width means a polyline of that width.
    """
    half = extent / 2.0
    if kind == "ellipse":
        t = np.linspace(0.0, 2.0 * np.pi, _ELLIPSE_VERTICES, endpoint=False)
        minor = half * rng.uniform(0.3, 1.0)
        return np.stack([half * np.cos(t), minor * np.sin(t)], axis=1), 0
    if kind == "rectangle":
        h = half * rng.uniform(0.3, 1.0)
        return np.array([[-half, -h], [half, -h], [half, h], [-half, h]]), 0
    if kind == "polygon":
        k = int(rng.integers(3, 10))
        # Evenly spread angles with jitter keep the outline simple (no self-intersection).
        t = (np.arange(k) + rng.uniform(-0.35, 0.35, k)) * (2.0 * np.pi / k)
        if rng.random() < 0.5:  # star: alternating outer and inner radii
            k2 = 2 * k
            t = np.arange(k2) * (2.0 * np.pi / k2) + rng.uniform(0, 2 * np.pi)
            r = np.where(np.arange(k2) % 2 == 0, half, half * rng.uniform(0.3, 0.6))
        else:  # irregular, roughly convex
            r = half * rng.uniform(0.6, 1.0, k)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1), 0
    if kind == "scratch":
        m = int(rng.integers(1, 5))  # segments
        headings = np.cumsum(np.concatenate([[0.0], rng.uniform(-np.pi / 4, np.pi / 4, m - 1)]))
        step = extent / m
        pts = np.concatenate(
            [[[0.0, 0.0]], np.cumsum(step * np.stack([np.cos(headings), np.sin(headings)], 1), 0)]
        )
        pts -= (pts.min(0) + pts.max(0)) / 2.0
        width = max(1, int(round(extent * rng.uniform(0.04, 0.12))))
        return pts, width
    raise ValueError(f"unknown shape kind {kind!r}; choose from {SHAPE_KINDS}")


def _draw_shape(
    canvas: ImageDraw.ImageDraw, h: int, w: int, kind: str, extent: float, rng: np.random.Generator
) -> None:
    """Draw one randomly rotated shape, placed fully inside the image when it fits."""
    pts, width = _shape_vertices(kind, extent, rng)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]])
    lo = pts.min(0) - width / 2.0
    hi = pts.max(0) + width / 2.0
    # Centre range keeping the bounding box inside; if the box is larger than the image the
    # reversed range makes the box cover the image on that axis (the shape stays mostly inside).
    centre = np.empty(2)
    for axis, side in enumerate((w, h)):
        a, b = -lo[axis], (side - 1) - hi[axis]
        centre[axis] = rng.uniform(min(a, b), max(a, b))
    xy = [(float(x), float(y)) for x, y in pts + centre]
    if width == 0:
        canvas.polygon(xy, fill=1)
    else:
        canvas.line(xy, fill=1, width=width, joint="curve")


def _random_mask_hw(
    h: int, w: int, cfg: SynthesisConfig, rng: np.random.Generator, kinds: Sequence[str]
) -> np.ndarray:
    if h * w < 2:
        raise ValueError(f"a mask needs 2 or more pixels to be neither empty nor full; got {h}x{w}")
    bad = [k for k in kinds if k not in SHAPE_KINDS]
    if not kinds or bad:
        raise ValueError(f"kinds must be a non-empty subset of {SHAPE_KINDS}; got {tuple(kinds)}")
    side = min(h, w)
    n_lo, n_hi = cfg.shapes_per_mask
    s_lo, s_hi = cfg.size_range
    for _ in range(_MAX_ATTEMPTS):
        img = Image.new("L", (w, h), 0)
        canvas = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(n_lo, n_hi + 1))):
            kind = kinds[int(rng.integers(len(kinds)))]
            extent = max(2.0, rng.uniform(s_lo, s_hi) * side)
            _draw_shape(canvas, h, w, kind, extent, rng)
        mask = np.asarray(img, dtype=np.uint8) > 0
        if mask.any() and not mask.all():
            return mask
    raise RuntimeError(
        f"no mask that is neither empty nor full in {_MAX_ATTEMPTS} draws for a {h}x{w} image; "
        f"lower SynthesisConfig.size_range {cfg.size_range} or shapes_per_mask "
        f"{cfg.shapes_per_mask}"
    )


def random_mask(
    size: int,
    cfg: SynthesisConfig,
    rng: np.random.Generator,
    kinds: Sequence[str] = SHAPE_KINDS,
) -> np.ndarray:
    """A union of randomly rotated shapes: bool [size, size], never empty and never full.

    The number of shapes is drawn in ``cfg.shapes_per_mask`` (inclusive), each shape's kind
    uniformly from ``kinds`` and its extent in ``cfg.size_range * size`` (see the module note).
    A draw that comes out empty or full is redrawn.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 2:
        raise ValueError(f"size must be an int >= 2 (the mask side in pixels); got {size!r}")
    return _random_mask_hw(int(size), int(size), cfg, rng, kinds)


def _check_pair(target: np.ndarray, source: np.ndarray, t_name: str, s_name: str) -> None:
    for name, arr in ((t_name, target), (s_name, source)):
        ok = isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim == 3
        if not ok or arr.shape[2] != 3:
            desc = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise ValueError(f"{name} must be a uint8 array [H, W, 3]; got {desc}")
    if target.shape != source.shape:
        raise ValueError(
            f"{t_name} has shape {target.shape} but {s_name} has shape {source.shape}; "
            f"resize both to the same [H, W, 3] first"
        )


def synthesize(
    target: np.ndarray,
    source: np.ndarray,
    cfg: SynthesisConfig,
    rng: np.random.Generator,
    kinds: Sequence[str] = SHAPE_KINDS,
) -> SynthesizedSample:
    """Paste a masked fragment of ``source`` onto ``target`` at a random offset.

    target, source: uint8 [H, W, 3] of the same shape. The mask is drawn at the fragment's place
    in ``source``; the offset is uniform over all shifts that keep the mask inside the image.
    Returns the image and the shifted mask: ``image[mask]`` are the shifted source pixels and
    ``image[~mask] == target[~mask]``.
    """
    _check_pair(target, source, "target", "source")
    h, w = target.shape[:2]
    cut = _random_mask_hw(h, w, cfg, rng, kinds)
    ys, xs = np.nonzero(cut)
    dy = int(rng.integers(-ys.min(), h - ys.max()))
    dx = int(rng.integers(-xs.min(), w - xs.max()))
    image = target.copy()
    mask = np.zeros((h, w), dtype=bool)
    image[ys + dy, xs + dx] = source[ys, xs]
    mask[ys + dy, xs + dx] = True
    return SynthesizedSample(image=image, mask=mask, offset=(dy, dx))


def build_pseudo_anomalies(
    normals: Sequence[np.ndarray],
    sources: Sequence[np.ndarray],
    per_normal: int,
    cfg: SynthesisConfig,
    seed: int,
    exclude_same_index: bool = True,
) -> list[SynthesizedSample]:
    """``per_normal`` pseudo-anomalies for each target in ``normals``, in target order.

    normals, sources: uint8 [H, W, 3] images, all of one shape. For target ``i`` the source is
    drawn uniformly from ``sources`` leaving out every ``sources[j] is normals[i]`` and, when
    ``exclude_same_index`` (for the usual call with the same list twice), index ``j == i``.
    With disjoint lists pass ``exclude_same_index=False`` so that every source is eligible. If
    nothing is left (a single image), the target is its own source, with a warning.

    Target ``i`` uses its own child generator spawned from ``seed``, so its samples do not depend
    on how many targets follow it.
    """
    is_int = isinstance(per_normal, (int, np.integer)) and not isinstance(per_normal, bool)
    if not is_int or per_normal < 0:
        raise ValueError(f"per_normal must be an int >= 0; got {per_normal!r}")
    if len(normals) and not len(sources):
        raise ValueError("sources is empty; pass at least one normal image to cut fragments from")
    children = np.random.SeedSequence(seed).spawn(len(normals))
    out: list[SynthesizedSample] = []
    for i, (target, child) in enumerate(zip(normals, children)):
        rng = np.random.default_rng(child)
        eligible = [
            j
            for j, src in enumerate(sources)
            if src is not target and not (exclude_same_index and j == i)
        ]
        if not eligible:
            warnings.warn(
                f"normals[{i}] has no other source image; pasting its own fragments "
                f"(pass more than one normal image to avoid this)",
                stacklevel=2,
            )
            eligible = list(range(len(sources)))
        for _ in range(per_normal):
            j = eligible[int(rng.integers(len(eligible)))]
            _check_pair(target, sources[j], f"normals[{i}]", f"sources[{j}]")
            s = synthesize(target, sources[j], cfg, rng)
            out.append(
                SynthesizedSample(
                    image=s.image, mask=s.mask, offset=s.offset, target_index=i, source_index=j
                )
            )
    return out
