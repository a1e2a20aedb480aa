import numpy as np
import pytest
import torch

from lafite_core.method.editing import edit_features, editing_weights
from lafite_core.method.knn import FaissKNN, TorchKNN, squared_distances


def _bank(m=500, d=12, seed=0):
    return np.random.default_rng(seed).normal(size=(m, d)).astype(np.float32)


def test_faiss_and_torch_agree_with_brute_force():
    bank = _bank()
    q = np.random.default_rng(1).normal(size=(300, 12)).astype(np.float32)
    brute = ((q[:, None] - bank[None]) ** 2).sum(-1)
    expect = np.argsort(brute, 1)[:, :5]
    for knn in (FaissKNN(bank), TorchKNN(bank, chunk=64)):
        nb = knn.search(q, 5)
        np.testing.assert_array_equal(nb.indices, expect)
        np.testing.assert_allclose(nb.distances, np.take_along_axis(brute, expect, 1), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        FaissKNN(bank).search(q, 501)


def test_squared_distances_match_brute_force_for_sets_and_one_point():
    a, b = torch.from_numpy(_bank(40, 7, 2)), torch.from_numpy(_bank(30, 7, 3))
    brute = ((a[:, None].double() - b[None].double()) ** 2).sum(-1)
    d = squared_distances(a, b)
    assert d.shape == (40, 30)
    torch.testing.assert_close(d.double(), brute, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(squared_distances(a, b[4]), d[:, 4], rtol=1e-5, atol=1e-5)
    a_sq, b_sq = (a * a).sum(1), (b * b).sum(1)
    assert torch.equal(squared_distances(a, b, a_sq, b_sq), d)


def test_weights_normalised_and_ordered():
    d = torch.tensor([[0.5, 1.0, 3.0], [2.0, 2.0, 2.0]])
    w = editing_weights(d)
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    assert w[0, 0] > w[0, 1] > w[0, 2]
    torch.testing.assert_close(w[1], torch.full((3,), 1 / 3))
    # eq. 10 before normalisation: (1 - softmax) sums to K - 1
    torch.testing.assert_close((1 - torch.softmax(d, 1)).sum(1), torch.full((2,), 2.0))
    assert editing_weights(torch.tensor([[7.0]])).item() == 1.0


def test_k1_is_nearest_neighbour_and_bank_members_unchanged():
    bank = _bank(200, 6)
    knn = FaissKNN(bank)
    feats = torch.from_numpy(bank[:16].T.copy().reshape(6, 4, 4))[None]  # bank members as a 4x4 map
    out = edit_features(feats, bank, knn, 1)
    torch.testing.assert_close(out, feats, rtol=0, atol=0)
    q = torch.randn(2, 6, 3, 3)
    out = edit_features(q, bank, knn, 1)
    flat = q.permute(0, 2, 3, 1).reshape(-1, 6).numpy()
    nn = ((flat[:, None] - bank[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(out.permute(0, 2, 3, 1).reshape(-1, 6).numpy(), bank[nn])


def test_k_greater_than_one_is_convex_combination_of_neighbours():
    bank = _bank(100, 3)
    q = torch.randn(1, 3, 2, 2)
    out = edit_features(q, bank, FaissKNN(bank), 4)
    assert out.shape == q.shape
    lo, hi = bank.min(0), bank.max(0)
    v = out.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    assert np.all(v >= lo - 1e-6) and np.all(v <= hi + 1e-6)


def test_faiss_search_in_calls_equals_one_call(monkeypatch):
    rng = np.random.default_rng(3)
    bank = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((1000, 16)).astype(np.float32)
    whole = FaissKNN(bank).search(queries, 4)
    monkeypatch.setattr(FaissKNN, "CALL_QUERIES", 7)  # 143 calls, the last one short
    parts = FaissKNN(bank).search(queries, 4)
    np.testing.assert_array_equal(parts.indices, whole.indices)
    np.testing.assert_array_equal(parts.distances, whole.distances)
    assert parts.indices.dtype == np.int64 and parts.distances.dtype == np.float32


def _clustered(m=4000, d=16, clusters=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)) * 4
    return (centres[rng.integers(0, clusters, m)] + rng.normal(size=(m, d))).astype(np.float32), centres


def test_inverted_file_finds_nearly_the_exact_neighbours_and_is_deterministic():
    from lafite_core.method.knn import ivf_centroids, ivf_lists

    bank, centres = _clustered()
    rng = np.random.default_rng(5)
    q = (centres[rng.integers(0, len(centres), 500)] + rng.normal(size=(500, 16))).astype(np.float32)
    # about 4 sqrt(M) lists, at least 32 members a list, at most one list a member when configured
    assert ivf_lists(100_000) == 1265 and ivf_lists(66_868) == 1034
    assert ivf_lists(len(bank)) == 125 and ivf_lists(100) == 3 and ivf_lists(10) == 1 and ivf_lists(100, 500) == 100
    cents = ivf_centroids(bank, ivf_lists(len(bank)), seed=0)
    assert cents.shape == (125, 16)
    np.testing.assert_array_equal(cents, ivf_centroids(bank, 125, seed=0))  # seeded: the same lists again
    exact = FaissKNN(bank).search(q, 5)
    ivf = FaissKNN(bank, centroids=cents, nprobe=8)
    assert not ivf.exact and FaissKNN(bank).exact
    got = ivf.search(q, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got.indices, exact.indices)])
    assert recall > 0.9
    assert (np.diff(got.distances, axis=1) >= 0).all()  # ascending, squared L2 to the returned rows
    brute = ((q[:, None] - bank[got.indices]) ** 2).sum(-1)
    np.testing.assert_allclose(got.distances, brute, rtol=1e-4, atol=1e-3)
    # every list probed: the exact answer
    full = FaissKNN(bank, centroids=cents, nprobe=125).search(q, 5)
    np.testing.assert_array_equal(full.indices, exact.indices)


def test_inverted_file_falls_back_to_exact_where_probed_lists_are_short():
    from lafite_core.method.knn import ivf_centroids

    bank, _ = _clustered(m=200, clusters=20)
    cents = ivf_centroids(bank, 20, seed=0)
    q = np.random.default_rng(3).normal(size=(50, 16)).astype(np.float32) * 4
    got = FaissKNN(bank, centroids=cents, nprobe=1).search(q, 30)  # one list of ~10 cannot hold 30
    assert (got.indices >= 0).all()
    exact = FaissKNN(bank).search(q, 30)
    short = [i for i in range(len(q))]
    np.testing.assert_array_equal(got.indices[short], exact.indices[short])
    with pytest.raises(ValueError, match="centroids"):
        FaissKNN(bank, centroids=cents[:, :3])


def test_an_ivf_model_keeps_its_centroids_and_scores_the_same_after_loading():
    from lafite_core.config import cpu_profile
    from lafite_core.method.model import BANK_CENTROIDS, LafiteModel, Scorer
    from lafite_core.method.normalize import FeatureStats
    from lafite_core.method.train import new_state

    cfg = cpu_profile().with_updates(
        diffusion={"base_channels": 16, "channel_mult": (1, 2), "epochs": 1, "batch_size": 4},
        backbone={"feature_size": 8}, features={"levels": None, "local_aggregation": 1},
        baseline={"recipe": "shared"})
    assert cfg.scoring.knn == "ivf"  # the cpu profile's choice
    x = torch.randn(12, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    st = FeatureStats.fit(x)
    bank = st.apply(x).permute(0, 2, 3, 1).reshape(-1, 6).numpy()[::2].copy()  # 384 members
    model = LafiteModel(cfg, st, new_state(6, 8, cfg.diffusion, 0, torch.device("cpu")).unet.eval(), bank, ("d/c",))
    assert model.bank_centroids is not None and model.bank_centroids.shape == (12, 6)
    files = model.to_files()
    assert BANK_CENTROIDS in files
    again = LafiteModel.from_files(files)
    np.testing.assert_array_equal(again.bank_centroids, model.bank_centroids)
    a, b = Scorer(model, "cpu"), Scorer(again, "cpu")
    assert not a.knn.exact
    torch.testing.assert_close(a.score(x[:3], "lafite", [1, 2, 3]).scores, b.score(x[:3], "lafite", [1, 2, 3]).scores)
    exact = LafiteModel(cfg.with_updates(scoring={"knn": "exact"}), st, model.unet, bank, ("d/c",))
    assert exact.bank_centroids is None and BANK_CENTROIDS not in exact.to_files() and Scorer(exact, "cpu").knn.exact
