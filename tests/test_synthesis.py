"""Tests for lafite_core.method.synthesis: mask properties, the paste invariant, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import ConvexHull

from lafite_core.config import SynthesisConfig
from lafite_core.method.synthesis import (
    SHAPE_KINDS,
    SynthesizedSample,
    build_pseudo_anomalies,
    random_mask,
    synthesize,
)

CFG = SynthesisConfig()
SIZE = 64


def _masks(cfg: SynthesisConfig, n: int, size: int = SIZE, kinds=SHAPE_KINDS) -> list[np.ndarray]:
    return [random_mask(size, cfg, np.random.default_rng(s), kinds) for s in range(n)]


# ---------------------------------------------------------------- random_mask


def test_mask_dtype_shape_nonempty_not_full() -> None:
    for m in _masks(CFG, 50):
        assert m.dtype == np.bool_ and m.shape == (SIZE, SIZE)
        assert m.any() and not m.all()


def test_mask_deterministic_per_generator_and_differs_between_seeds() -> None:
    a = random_mask(SIZE, CFG, np.random.default_rng(7))
    b = random_mask(SIZE, CFG, np.random.default_rng(7))
    c = random_mask(SIZE, CFG, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_mask_area_varies_and_stays_within_size_bounds() -> None:
    n_lo, n_hi = CFG.shapes_per_mask
    s_lo, s_hi = CFG.size_range
    areas = np.array([m.sum() for m in _masks(CFG, 50)])
    # Each shape fits in an (extent + 2)-pixel square (rasterised edges add at most a pixel a side).
    upper = n_hi * (s_hi * SIZE + 2) ** 2
    # The smallest shape is a 1-pixel-wide scratch whose length is at least s_lo * SIZE.
    lower = 0.5 * s_lo * SIZE
    assert areas.max() <= upper, (areas.max(), upper)
    assert areas.min() >= lower, (areas.min(), lower)
    assert len(np.unique(areas)) >= 20  # diverse sizes and shape counts
    assert areas.std() / areas.mean() > 0.3


def test_mask_size_range_controls_area() -> None:
    small = SynthesisConfig(size_range=(0.05, 0.1))
    large = SynthesisConfig(size_range=(0.3, 0.4))
    a_small = np.array([m.sum() for m in _masks(small, 30)])
    a_large = np.array([m.sum() for m in _masks(large, 30)])
    assert a_small.max() < np.median(a_large)


def test_mask_shape_count_controls_components() -> None:
    one = SynthesisConfig(shapes_per_mask=(1, 1), size_range=(0.05, 0.1))
    many = SynthesisConfig(shapes_per_mask=(4, 4), size_range=(0.05, 0.1))
    # One shape is one connected piece (8-connectivity); four small shapes rarely all touch.
    eight = np.ones((3, 3), dtype=bool)
    convex = ("ellipse", "rectangle")
    n_one = [ndimage.label(m, structure=eight)[1] for m in _masks(one, 30, kinds=convex)]
    n_many = [ndimage.label(m, structure=eight)[1] for m in _masks(many, 30, kinds=convex)]
    assert set(n_one) == {1}
    assert np.mean(n_many) > 2.5
    # A range (1, 4) draws the count per mask: both single pieces and several pieces occur.
    ranged = SynthesisConfig(shapes_per_mask=(1, 4), size_range=(0.05, 0.1))
    n_ranged = [ndimage.label(m, structure=eight)[1] for m in _masks(ranged, 40, kinds=convex)]
    assert 1 in n_ranged and max(n_ranged) >= 3


@pytest.mark.parametrize("kind", SHAPE_KINDS)
def test_each_kind_draws_a_non_empty_shape_of_the_right_size(kind: str) -> None:
    cfg = SynthesisConfig(shapes_per_mask=(1, 1), size_range=(0.2, 0.3))
    for m in _masks(cfg, 20, kinds=(kind,)):
        ys, xs = np.nonzero(m)
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        # The rotated shape's bounding box lies between half its extent and its diagonal (+ pen).
        assert 0.3 * 0.2 * SIZE <= extent <= 0.3 * SIZE * np.sqrt(2) + 3, (kind, extent)


def test_single_shape_extent_spans_size_range() -> None:
    cfg = SynthesisConfig(shapes_per_mask=(1, 1), size_range=(0.05, 0.4))
    extents = []
    for m in _masks(cfg, 40, kinds=("ellipse", "rectangle")):
        ys, xs = np.nonzero(m)
        extents.append(max(np.ptp(ys), np.ptp(xs)) + 1)
    # Bounding box of a rotated shape of extent s: between s / sqrt(2) and s * sqrt(2) + pen.
    assert min(extents) < 0.15 * SIZE  # some near 0.05 * SIZE
    assert max(extents) > 0.25 * SIZE  # some near 0.4 * SIZE


@pytest.mark.parametrize("kind", ["ellipse", "rectangle"])
def test_convex_kinds_fill_their_hull(kind: str) -> None:
    cfg = SynthesisConfig(shapes_per_mask=(1, 1), size_range=(0.3, 0.4))
    for m in _masks(cfg, 10, kinds=(kind,)):
        pts = np.argwhere(m).astype(float)
        hull_area = ConvexHull(pts).volume  # 2-D "volume" is the area, through pixel centres
        assert m.sum() >= 0.9 * hull_area


def test_scratch_is_thin() -> None:
    cfg = SynthesisConfig(shapes_per_mask=(1, 1), size_range=(0.3, 0.4))
    for m in _masks(cfg, 10, kinds=("scratch",)):
        # Length <= extent and width <= 0.12 * extent + 1: far below an extent x extent square.
        assert m.sum() <= 0.25 * (0.4 * SIZE + 2) ** 2


def test_rectangles_are_rotated() -> None:
    cfg = SynthesisConfig(shapes_per_mask=(1, 1), size_range=(0.3, 0.4))
    fills = []
    for m in _masks(cfg, 20, kinds=("rectangle",)):
        ys, xs = np.nonzero(m)
        bbox = (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
        fills.append(m.sum() / bbox)
    # An axis-aligned rectangle fills its bounding box; rotated ones fill much less.
    assert min(fills) < 0.75
    assert np.std(fills) > 0.05


def test_tiny_image_with_huge_shapes_is_redrawn_never_full() -> None:
    cfg = SynthesisConfig(shapes_per_mask=(2, 3), size_range=(0.8, 1.0))
    for m in _masks(cfg, 30, size=8):
        assert m.any() and not m.all()


def test_mask_rejects_bad_size_and_kind() -> None:
    with pytest.raises(ValueError, match="size"):
        random_mask(1, CFG, np.random.default_rng(0))
    with pytest.raises(ValueError, match="kinds"):
        random_mask(SIZE, CFG, np.random.default_rng(0), kinds=("circle",))


# ---------------------------------------------------------------- synthesize


def _pair(h: int = 48, w: int = 40) -> tuple[np.ndarray, np.ndarray]:
    target = np.zeros((h, w, 3), dtype=np.uint8)
    # Every source pixel non-zero and each position distinguishable by its (y, x) encoding.
    yy, xx = np.mgrid[0:h, 0:w]
    source = np.stack([yy + 1, xx + 1, np.full_like(yy, 200)], axis=-1).astype(np.uint8)
    return target, source


def test_synthesize_mask_is_exactly_the_changed_pixels() -> None:
    target, source = _pair()
    for s in range(30):
        out = synthesize(target, source, CFG, np.random.default_rng(s))
        assert isinstance(out, SynthesizedSample)
        assert out.image.dtype == np.uint8 and out.image.shape == target.shape
        assert out.mask.dtype == np.bool_ and out.mask.shape == target.shape[:2]
        np.testing.assert_array_equal((out.image != target).any(-1), out.mask)
        assert out.mask.any() and not out.mask.all()


def test_synthesize_pastes_shifted_source_pixels_and_keeps_the_rest() -> None:
    rng = np.random.default_rng(123)
    target = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    source = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    for s in range(30):
        out = synthesize(target, source, CFG, np.random.default_rng(s))
        dy, dx = out.offset
        ys, xs = np.nonzero(out.mask)
        assert 0 <= ys.min() - dy and ys.max() - dy < 40  # the fragment came from inside
        assert 0 <= xs.min() - dx and xs.max() - dx < 56
        np.testing.assert_array_equal(out.image[ys, xs], source[ys - dy, xs - dx])
        np.testing.assert_array_equal(out.image[~out.mask], target[~out.mask])


def test_synthesize_offsets_vary_and_inputs_are_untouched() -> None:
    target, source = _pair()
    t0, s0 = target.copy(), source.copy()
    offsets = {synthesize(target, source, CFG, np.random.default_rng(s)).offset for s in range(20)}
    assert len(offsets) > 10
    np.testing.assert_array_equal(target, t0)
    np.testing.assert_array_equal(source, s0)


def test_synthesize_deterministic() -> None:
    target, source = _pair()
    a = synthesize(target, source, CFG, np.random.default_rng(5))
    b = synthesize(target, source, CFG, np.random.default_rng(5))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.offset == b.offset


def test_synthesize_shape_mismatch_names_both_shapes() -> None:
    target = np.zeros((32, 32, 3), dtype=np.uint8)
    source = np.zeros((32, 48, 3), dtype=np.uint8)
    with pytest.raises(ValueError) as err:
        synthesize(target, source, CFG, np.random.default_rng(0))
    assert "(32, 32, 3)" in str(err.value) and "(32, 48, 3)" in str(err.value)


def test_synthesize_rejects_non_rgb_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        synthesize(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)), CFG, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        synthesize(
            np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), CFG, np.random.default_rng(0)
        )


# ---------------------------------------------------------------- build_pseudo_anomalies


def _constant_images(n: int, size: int = 32) -> list[np.ndarray]:
    """Image k is the constant 10 * (k + 1), so a pasted value tells which source it came from."""
    return [np.full((size, size, 3), 10 * (k + 1), dtype=np.uint8) for k in range(n)]


def test_build_count_order_and_determinism() -> None:
    normals = _constant_images(4)
    a = build_pseudo_anomalies(normals, normals, per_normal=3, cfg=CFG, seed=11)
    b = build_pseudo_anomalies(normals, normals, per_normal=3, cfg=CFG, seed=11)
    c = build_pseudo_anomalies(normals, normals, per_normal=3, cfg=CFG, seed=12)
    assert len(a) == 12
    assert [s.target_index for s in a] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.mask, y.mask)
        assert (x.offset, x.source_index) == (y.offset, y.source_index)
    assert any(not np.array_equal(x.mask, z.mask) for x, z in zip(a, c))


def test_build_prefix_is_stable() -> None:
    normals = _constant_images(4)
    full = build_pseudo_anomalies(normals, normals, 2, CFG, seed=3)
    part = build_pseudo_anomalies(normals[:2], normals, 2, CFG, seed=3)
    for x, y in zip(part, full):
        np.testing.assert_array_equal(x.mask, y.mask)
        assert x.source_index == y.source_index


def test_build_never_uses_the_target_as_source() -> None:
    normals = _constant_images(3)
    samples = build_pseudo_anomalies(normals, normals, per_normal=10, cfg=CFG, seed=0)
    used = set()
    for s in samples:
        assert s.source_index != s.target_index
        pasted = np.unique(s.image[s.mask])
        assert pasted.tolist() == [10 * (s.source_index + 1)]  # content agrees with the index
        np.testing.assert_array_equal(s.mask, (s.image != normals[s.target_index]).any(-1))
        used.add(s.source_index)
    assert used == {0, 1, 2}


def test_build_excludes_same_object_even_across_list_copies() -> None:
    normals = _constant_images(2)
    sources = [normals[1], normals[0]]  # same arrays, other order
    samples = build_pseudo_anomalies(normals, sources, 10, CFG, seed=1, exclude_same_index=False)
    for s in samples:
        assert sources[s.source_index] is not normals[s.target_index]


def test_build_disjoint_sources_all_eligible_without_index_exclusion() -> None:
    normals = _constant_images(2)
    sources = _constant_images(5)[2:]  # values 30, 40, 50, distinct arrays
    samples = build_pseudo_anomalies(normals, sources, 30, CFG, seed=2, exclude_same_index=False)
    assert {s.source_index for s in samples if s.target_index == 0} == {0, 1, 2}


def test_build_single_image_warns_and_uses_itself() -> None:
    normals = _constant_images(1)
    with pytest.warns(UserWarning, match="no other source"):
        samples = build_pseudo_anomalies(normals, normals, 2, CFG, seed=0)
    assert [s.source_index for s in samples] == [0, 0]


def test_build_shape_mismatch_and_bad_arguments() -> None:
    normals = _constant_images(2, size=32)
    sources = _constant_images(2, size=16)
    with pytest.raises(ValueError) as err:
        build_pseudo_anomalies(normals, sources, 1, CFG, seed=0, exclude_same_index=False)
    assert "(32, 32, 3)" in str(err.value) and "(16, 16, 3)" in str(err.value)
    with pytest.raises(ValueError, match="per_normal"):
        build_pseudo_anomalies(normals, normals, -1, CFG, seed=0)
    with pytest.raises(ValueError, match="sources is empty"):
        build_pseudo_anomalies(normals, [], 1, CFG, seed=0)
