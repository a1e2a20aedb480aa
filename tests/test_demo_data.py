"""Tests for the synthetic demo dataset: layout, masks, determinism, defect placement, caching."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from flows.demo_data import (
    CATEGORIES,
    DEFECTS,
    MARKER,
    MAX_DEFECT_FRACTION,
    MIN_DEFECT_FRACTION,
    DemoSpec,
    DemoSummary,
    generate_demo_dataset,
    render,
)
from flows.demo_data import _SCENES  # the scene a defect is drawn on

SMALL = DemoSpec(image_size=96, train_per_category=3, test_good_per_category=2, test_defect_per_type=2)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoSummary, float]:
    root = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    summary = generate_demo_dataset(root)
    return summary, time.perf_counter() - start


def test_categories_and_defects_are_declared() -> None:
    assert len(CATEGORIES) >= 3
    assert set(DEFECTS) == set(CATEGORIES)
    assert all(len(DEFECTS[c]) == 2 and len(set(DEFECTS[c])) == 2 for c in CATEGORIES)
    assert all("good" not in DEFECTS[c] for c in CATEGORIES)


def test_layout_and_counts_match_spec(default_set: tuple[DemoSummary, float]) -> None:
    summary, _ = default_set
    spec = DemoSpec()
    top = summary.root / summary.dataset
    assert summary.path == top and summary.categories == CATEGORIES
    expected = {MARKER}
    for c in CATEGORIES:
        expected |= {f"{c}/train/good/{i:03d}.png" for i in range(spec.train_per_category)}
        expected |= {f"{c}/test/good/{i:03d}.png" for i in range(spec.test_good_per_category)}
        for d in DEFECTS[c]:
            expected |= {f"{c}/test/{d}/{i:03d}.png" for i in range(spec.test_defect_per_type)}
            expected |= {f"{c}/ground_truth/{d}/{i:03d}_mask.png" for i in range(spec.test_defect_per_type)}
    found = {p.relative_to(top).as_posix() for p in top.rglob("*") if p.is_file()}
    assert found == expected
    n = len(CATEGORIES)
    assert summary.num_train == n * spec.train_per_category == len(list(top.glob("*/train/good/*.png")))
    assert summary.num_test == len(list(top.glob("*/test/*/*.png")))
    assert summary.num_test == n * (spec.test_good_per_category + 2 * spec.test_defect_per_type)
    assert summary.num_masks == n * 2 * spec.test_defect_per_type == len(list(top.glob("*/ground_truth/*/*")))
    assert not list(top.glob("*/ground_truth/good"))
    # nothing left behind next to the set (the staging folder is removed)
    assert [p.name for p in summary.root.iterdir()] == [summary.dataset]


def test_images_and_masks_are_well_formed(default_set: tuple[DemoSummary, float]) -> None:
    summary, _ = default_set
    top = summary.path
    size = DemoSpec().image_size
    for path in top.glob("*/t*/*/*.png"):
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (size, size), path
    for c in CATEGORIES:
        for d in DEFECTS[c]:
            for image_path in sorted((top / c / "test" / d).glob("*.png")):
                mask_path = top / c / "ground_truth" / d / f"{image_path.stem}_mask.png"
                with Image.open(mask_path) as m:
                    assert m.mode == "L" and m.size == (size, size), mask_path
                mask = _load(mask_path)
                assert set(np.unique(mask)) <= {0, 255}, mask_path
                area = (mask == 255).mean()
                assert MIN_DEFECT_FRACTION <= area <= MAX_DEFECT_FRACTION, (mask_path, area)


def test_discovery_reads_the_demo_set(default_set: tuple[DemoSummary, float]) -> None:
    pytest.importorskip("fsspec")
    from lafite_core.datapath.data import discover

    summary, _ = default_set
    found = {c.name: c for c in discover(str(summary.path))}
    assert set(found) == set(CATEGORIES)
    for c in found.values():
        assert c.dataset == summary.dataset and not c.missing_masks
        assert sum(s.mask_url is not None for s in c.test) == 2 * DemoSpec().test_defect_per_type


def test_defect_is_visible_where_the_mask_is(default_set: tuple[DemoSummary, float]) -> None:
    # On the written files: deviation from the category's mean normal image is larger on the mask.
    top = default_set[0].path
    for c in CATEGORIES:
        mean = np.mean([_load(p).astype(float) for p in (top / c / "train" / "good").glob("*.png")], axis=0)
        for d in DEFECTS[c]:
            for image_path in sorted((top / c / "test" / d).glob("*.png")):
                mask = _load(top / c / "ground_truth" / d / f"{image_path.stem}_mask.png") > 0
                dev = np.abs(_load(image_path).astype(float) - mean).max(axis=2)
                assert dev[mask].mean() > 1.5 * dev[~mask].mean() + 10, (image_path, dev[mask].mean(),
                                                                        dev[~mask].mean())


@pytest.mark.parametrize("category", CATEGORIES)
def test_render_changes_exactly_the_mask(category: str) -> None:
    for defect, seed in itertools.product(DEFECTS[category], range(6)):
        clean, clean_mask = render(category, np.random.default_rng(seed), None)
        bad, mask = render(category, np.random.default_rng(seed), defect)
        assert clean.shape == bad.shape == (224, 224, 3) and clean.dtype == bad.dtype == np.uint8
        assert mask.shape == (224, 224) and mask.dtype == bool
        assert not clean_mask.any()
        assert MIN_DEFECT_FRACTION <= mask.mean() <= MAX_DEFECT_FRACTION
        change = np.abs(bad.astype(int) - clean.astype(int)).max(axis=2)
        outside = (change > 0) & ~mask
        border = ndimage.binary_dilation(mask) & ~mask
        assert not (outside & ~border).any(), f"{category}/{defect} seed {seed}: changes far from the mask"
        assert outside.sum() <= 0.02 * mask.sum()
        # the mask is not padded with unchanged pixels: nearly all of it changed visibly
        visibly = (change[mask] > 10).mean()
        assert visibly >= 0.85, f"{category}/{defect} seed {seed}: only {visibly:.0%} of mask changed"


@pytest.mark.parametrize("category", CATEGORIES)
def test_defects_lie_on_the_part(category: str) -> None:
    # render() draws the scene first, so a fresh generator in the same state rebuilds the scene the
    # defect was drawn on. Defects may only touch the object (any part of it, for "missing").
    for defect, seed in itertools.product(DEFECTS[category], range(4)):
        scene = _SCENES[category](np.random.default_rng(seed), 224)
        _, mask = render(category, np.random.default_rng(seed), defect)
        allowed = scene.coverage > 0.02 if defect == "missing" else scene.part
        assert not (mask & ~allowed).any(), f"{category}/{defect} seed {seed}: defect off the part"
    # and the part of an object is not the whole image: the background is excluded
    if category != "weave":
        scene = _SCENES[category](np.random.default_rng(0), 224)
        assert 0.1 < scene.part.mean() < 0.6
        clean, _ = render(category, np.random.default_rng(0), None)
        assert np.abs(clean[scene.part].mean(0) - clean[scene.coverage == 0].mean(0)).max() > 40


def test_render_is_deterministic_and_sized() -> None:
    a = render("washer", np.random.default_rng(3), "scratch", image_size=128)
    b = render("washer", np.random.default_rng(3), "scratch", image_size=128)
    assert a.image.shape == (128, 128, 3) and a.mask.shape == (128, 128)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    c = render("washer", np.random.default_rng(4), "scratch", image_size=128)
    assert not np.array_equal(a.image, c.image)


def test_render_rejects_bad_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown demo category"):
        render("carpet", rng)
    with pytest.raises(ValueError, match="has no defect"):
        render("weave", rng, "scratch")
    with pytest.raises(ValueError, match="image_size"):
        render("weave", rng, None, image_size=16)


def test_spec_and_arguments_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        DemoSpec(image_size=32)
    with pytest.raises(ValueError, match="train_per_category"):
        DemoSpec(train_per_category=0)
    with pytest.raises(ValueError, match="test_defect_per_type"):
        DemoSpec(test_defect_per_type=-1)
    with pytest.raises(ValueError, match="seed"):
        generate_demo_dataset(tmp_path, SMALL, seed=-1)
    with pytest.raises(ValueError, match="dataset"):
        generate_demo_dataset(tmp_path, SMALL, dataset="a/b")
    assert not any(tmp_path.iterdir())


def test_normals_vary_within_a_family_and_families_differ(default_set: tuple[DemoSummary, float]) -> None:
    top = default_set[0].path
    normals = {c: np.stack([_load(p).astype(float) for p in sorted((top / c / "train" / "good").glob("*.png"))])
               for c in CATEGORIES}
    means = {c: x.mean(axis=0) for c, x in normals.items()}
    for c, x in normals.items():
        for i, j in itertools.combinations(range(len(x)), 2):
            assert np.abs(x[i] - x[j]).mean() > 2.0, f"{c}: normals {i} and {j} are nearly identical"
    for a, b in itertools.combinations(CATEGORIES, 2):
        assert np.abs(means[a] - means[b]).mean() > 25.0, f"{a} and {b} look alike on average"
    # every normal image is nearer its own category's mean than any other category's
    for c, x in normals.items():
        for img in x:
            own = np.abs(img - means[c]).mean()
            assert all(own < np.abs(img - means[o]).mean() for o in CATEGORIES if o != c), c


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    first = generate_demo_dataset(tmp_path / "a", SMALL, seed=7)
    second = generate_demo_dataset(tmp_path / "b", SMALL, seed=7)
    other = generate_demo_dataset(tmp_path / "c", SMALL, seed=8)
    fa, fb, fc = _files(first.path), _files(second.path), _files(other.path)
    assert fa == fb
    assert set(fa) == set(fc)
    images = [k for k in fa if k.endswith(".png") and "ground_truth" not in k]
    assert all(fa[k] != fc[k] for k in images)
    with Image.open(first.path / "weave" / "train" / "good" / "000.png") as im:
        assert im.size == (96, 96)


def test_complete_set_is_not_rewritten(tmp_path: Path) -> None:
    summary = generate_demo_dataset(tmp_path, SMALL, seed=1)
    paths = [p for p in summary.path.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in paths}
    time.sleep(0.02)
    again = generate_demo_dataset(tmp_path, SMALL, seed=1)
    assert again == summary
    assert {p: p.stat().st_mtime_ns for p in paths} == before


def test_incomplete_set_is_regenerated(tmp_path: Path) -> None:
    summary = generate_demo_dataset(tmp_path, SMALL, seed=1)
    original = _files(summary.path)
    (summary.path / MARKER).unlink()
    (summary.path / "washer" / "test" / "crack" / "001.png").unlink()
    (summary.path / "bracket" / "train" / "good" / "000.png").write_bytes(b"half-written")
    again = generate_demo_dataset(tmp_path, SMALL, seed=1)
    assert again == summary
    assert _files(summary.path) == original
    assert [p.name for p in tmp_path.iterdir()] == [summary.dataset]


def test_set_for_another_seed_or_spec_is_replaced(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path, SMALL, seed=1)
    bigger = DemoSpec(image_size=96, train_per_category=4, test_good_per_category=1, test_defect_per_type=1)
    summary = generate_demo_dataset(tmp_path, bigger, seed=2)
    assert summary.num_train == 4 * len(CATEGORIES)
    files = _files(summary.path)
    assert len([k for k in files if "/train/good/" in k]) == summary.num_train
    assert len([k for k in files if "_mask.png" in k]) == summary.num_masks
    fresh = generate_demo_dataset(tmp_path / "fresh", bigger, seed=2)
    assert files == _files(fresh.path)


def test_foreign_folder_is_not_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    (target / "my_category" / "train" / "good").mkdir(parents=True)
    precious = target / "my_category" / "train" / "good" / "photo.jpg"
    precious.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="did not write"):
        generate_demo_dataset(tmp_path, SMALL)
    assert precious.read_bytes() == b"user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
