import numpy as np
import pytest

from lafite_core.config import CoresetConfig
from lafite_core.method.coreset import covering_radius, greedy_kcenter, project, select_coreset

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
