import dataclasses

import numpy as np
import pytest

from lafite_core.config import CoresetConfig
from lafite_core.method.coreset import (
    BankSources,
    bank_rows,
    covering_radius,
    greedy_kcenter,
    image_keys,
    merge_plan,
    project,
    select_coreset,
)

import torch


def _points(n=3000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d)) * 5
    return (centres[rng.integers(20, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_size_uniqueness_and_determinism():
    x = _points()
    cfg = CoresetConfig(keep_rate=0.1, projection_dim=8, chunk_size=1000)
    a = select_coreset(x, cfg, seed=3, device="cpu")
    b = select_coreset(x, cfg, seed=3, device="cpu")
    c = select_coreset(x, cfg, seed=4, device="cpu")
    assert a.indices.size == 300 and a.num_chunks == 3
    assert np.unique(a.indices).size == a.indices.size
    assert a.indices.min() >= 0 and a.indices.max() < len(x)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(np.sort(a.indices), np.sort(c.indices))


def test_groups_are_kept_apart_with_their_share():
    x = _points(2000)
    groups = np.array(["a"] * 500 + ["b"] * 1500)
    core = select_coreset(x, CoresetConfig(keep_rate=0.2, projection_dim=16), seed=0, groups=groups, device="cpu")
    chosen = groups[core.indices]
    assert (chosen == "a").sum() == 100 and (chosen == "b").sum() == 300


def test_duplicates_never_selected_twice():
    x = np.zeros((50, 4), dtype=np.float32)
    x[:5] = np.eye(4, dtype=np.float32)[:4].repeat(2, 0)[:5]
    sel = greedy_kcenter(torch.from_numpy(x), 20, 0)
    assert len(set(sel.tolist())) == 20


def test_exact_greedy_is_farthest_point_order():
    x = torch.tensor([[0.0], [1.0], [10.0], [4.0], [6.0]])
    assert greedy_kcenter(x, 3, 0).tolist() == [0, 2, 3]


def test_chunked_radius_close_to_exact_greedy():
    x = _points(4000, 16)
    exact = greedy_kcenter(torch.from_numpy(x), 200, 0).numpy()
    approx = select_coreset(x, CoresetConfig(keep_rate=0.05, projection_dim=16, chunk_size=1000), 0, device="cpu")
    r_exact = covering_radius(x, exact)
    r_approx = covering_radius(x, approx.indices)
    assert approx.indices.size == 200
    assert r_approx <= 1.5 * r_exact, (r_approx, r_exact)
    # and far better than a random subset of the same size
    rand = np.random.default_rng(0).choice(len(x), 200, replace=False)
    assert r_approx < covering_radius(x, rand)


def test_projection_preserves_distances_roughly():
    x = np.random.default_rng(0).normal(size=(200, 512)).astype(np.float32)
    p = project(x, 128, 0).numpy()
    d0 = np.linalg.norm(x[:100] - x[100:], axis=1)
    d1 = np.linalg.norm(p[:100] - p[100:], axis=1)
    assert np.median(np.abs(d1 / d0 - 1)) < 0.1


def test_bad_input():
    with pytest.raises(ValueError):
        select_coreset(np.zeros((0, 4), np.float32), CoresetConfig(), 0)


# --------------------------------------------------------------------------- merging a parent's bank (warm start)

PER_IMAGE = 16
MERGE_CFG = CoresetConfig(keep_rate=0.05, projection_dim=16, chunk_size=1000)


def _images(n, seed):
    """n images of PER_IMAGE patches from _points' mixture: [n * PER_IMAGE, 16]."""
    return _points(n * PER_IMAGE, 16, seed)


def _sources(ids, groups, rows):
    return BankSources.of(ids, [f"h-{i}" for i in ids], np.array(groups), PER_IMAGE, rows)


def test_a_merged_bank_keeps_the_parents_rows_and_covers_every_patch_as_its_chunks_do():
    # parent: 120 images of "a" and 60 of "b"; tonight: the same images in another order plus 24 + 12 new ones
    old = {"a": _images(120, 0).reshape(120, PER_IMAGE, 16), "b": _images(60, 1).reshape(60, PER_IMAGE, 16)}
    new = {"a": _images(24, 2).reshape(24, PER_IMAGE, 16), "b": _images(12, 3).reshape(12, PER_IMAGE, 16)}
    p_ids = [f"{g}/{i}" for g in "ab" for i in range(len(old[g]))]
    p_groups = np.array([i.split("/")[0] for i in p_ids])
    p_patches = np.concatenate([old["a"], old["b"]]).reshape(-1, 16)
    parent = _sources(p_ids, p_groups, bank_rows(p_patches, PER_IMAGE, p_groups, MERGE_CFG, 0))

    order = np.random.default_rng(5).permutation(len(p_ids))  # the store returns images in another order
    ids = [p_ids[i] for i in order] + [f"{g}/new{i}" for g in "ab" for i in range(len(new[g]))]
    groups = np.array([i.split("/")[0] for i in ids])
    patches = np.concatenate([p_patches.reshape(-1, PER_IMAGE, 16)[order], new["a"], new["b"]]).reshape(-1, 16)
    hashes = [f"h-{i}" for i in ids]
    plan = merge_plan(parent, parent.rows, PER_IMAGE, ids, hashes, groups, PER_IMAGE)
    assert plan.merged == ("a", "b") and plan.rebuilt == {}
    assert sorted(plan.images.tolist()) == list(range(len(p_ids), len(ids)))  # only the new images
    np.testing.assert_array_equal(np.sort(patches[plan.kept], axis=0), np.sort(p_patches[parent.rows], axis=0))

    merged = bank_rows(patches, PER_IMAGE, groups, MERGE_CFG, 0, plan.images, plan.kept)
    rebuilt = bank_rows(patches, PER_IMAGE, groups, MERGE_CFG, 0)
    assert np.unique(merged).size == merged.size and abs(merged.size - rebuilt.size) <= 4  # keep rate, per chunk
    assert set(plan.kept.tolist()) <= set(merged.tolist())
    for g in "ab":  # each category keeps its share
        assert abs(int((groups[merged // PER_IMAGE] == g).sum()) - int((groups[rebuilt // PER_IMAGE] == g).sum())) <= 2
    # every old patch is covered by its parent chunk's centres, every new one by the new chunks' centres
    old_rows = np.arange(len(p_ids) * PER_IMAGE)
    new_rows = np.arange(len(p_ids) * PER_IMAGE, len(patches))
    bound = max(covering_radius(patches[old_rows], np.searchsorted(old_rows, plan.kept)),
                covering_radius(patches[new_rows], np.searchsorted(new_rows, np.setdiff1d(merged, plan.kept))))
    r_merged, r_rebuilt = covering_radius(patches, merged), covering_radius(patches, rebuilt)
    assert r_merged <= bound + 1e-4
    assert r_merged <= 1.25 * r_rebuilt, (r_merged, r_rebuilt)
    rand = np.random.default_rng(0).choice(len(patches), merged.size, replace=False)
    assert r_merged < covering_radius(patches, rand)


def test_a_category_that_lost_or_changed_an_image_is_rebuilt():
    p_ids = [f"a/{i}" for i in range(40)] + [f"b/{i}" for i in range(40)]
    p_groups = np.array([i[0] for i in p_ids])
    p_patches = _images(80, 0)
    parent = _sources(p_ids, p_groups, bank_rows(p_patches, PER_IMAGE, p_groups, MERGE_CFG, 0))
    ids = p_ids[1:]  # a/0 removed (or now held out)
    groups = np.array([i[0] for i in ids])
    hashes = [f"h-{i}" for i in ids]
    hashes[-1] = "changed"  # b/39 has new content
    plan = merge_plan(parent, parent.rows, PER_IMAGE, ids, hashes, groups, PER_IMAGE)
    assert plan.merged == () and set(plan.rebuilt) == {"a", "b"} and plan.kept.size == 0
    assert "1 of the parent's 40 images" in plan.rebuilt["a"] and plan.images.size == len(ids)
    plan = merge_plan(parent, parent.rows, PER_IMAGE, p_ids[:40] + ids[39:-1], [f"h-{i}" for i in p_ids[:79]],
                      p_groups[:79], PER_IMAGE)  # b/39 removed: a merges, b is rebuilt
    assert plan.merged == ("a",) and list(plan.rebuilt) == ["b"]
    assert (p_groups[plan.kept // PER_IMAGE] == "a").all() and sorted(plan.images.tolist()) == list(range(40, 79))
    c = merge_plan(parent, parent.rows, PER_IMAGE, p_ids + ["c/0", "c/1"], [f"h-{i}" for i in p_ids] + ["x", "y"],
                   np.concatenate([p_groups, ["c", "c"]]), PER_IMAGE)
    assert c.merged == ("a", "b") and c.rebuilt == {"c": "the parent did not fit on it"}
    twice = merge_plan(parent, parent.rows, PER_IMAGE, p_ids + ["a/1"], [f"h-{i}" for i in p_ids] + ["h-a/1"],
                       np.concatenate([p_groups, ["a"]]), PER_IMAGE)  # one image read twice: not mapped twice
    assert twice.merged == ("b",) and "1 images appear twice" in twice.rebuilt["a"]
    with pytest.raises(ValueError, match="patches an image"):
        merge_plan(parent, parent.rows, PER_IMAGE, p_ids, [f"h-{i}" for i in p_ids], p_groups, 4)


def test_bank_sources_round_trip_in_16_bytes_an_image():
    ids = [f"d/c{i % 2}/train/good/{i:05d}" for i in range(1000)]
    s = BankSources.of(ids, ["ab" * 32] * 1000, np.array([i.split("/")[1] for i in ids]), 784, np.arange(0, 784_000, 97),
                       196, np.array([5, 6]))
    data = s.to_bytes()
    t = BankSources.from_bytes(data)
    for f in ("images", "categories", "category", "rows", "baseline_rows"):
        np.testing.assert_array_equal(getattr(s, f), getattr(t, f))
    assert (t.per_image, t.baseline_per_image) == (784, 196) and t.groups.tolist() == [i.split("/")[1] for i in ids]
    assert len(set(t.images.tolist())) == 1000 and len(data) < 16 * 1000 + 8 * t.rows.size + 2000
    assert not set(t.images.tolist()) & set(image_keys(ids, ["cd" * 32] * 1000).tolist())  # content is identity
    u = BankSources.from_bytes(dataclasses.replace(s, baseline_rows=None, baseline_per_image=0).to_bytes())
    assert u.baseline_rows is None
