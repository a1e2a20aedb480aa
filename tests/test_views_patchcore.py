"""Feature views (level choice, local aggregation) and the PatchCore baseline recipe."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from lafite_core.config import BaselineConfig, CoresetConfig, ViewConfig, config_hash, cpu_profile
from lafite_core.method.knn import knn_for
from lafite_core.method.model import BASELINE_BANK, LafiteModel, Scorer
from lafite_core.method.normalize import FeatureStats
from lafite_core.method.patchcore import build_bank, patchcore_maps, reweighted_scores
from lafite_core.method.train import new_state
from lafite_core.method.views import apply_view, level_window, native_grids, view_channels

CHANNELS = (2, 3, 4)  # three levels, 9 channels


def _raw(n=4, s=8, seed=0):
    return torch.randn(n, sum(CHANNELS), s, s, generator=torch.Generator().manual_seed(seed))


def test_view_channels_pick_level_blocks():
    assert view_channels(CHANNELS, None) == list(range(9))
    assert view_channels(CHANNELS, (1, 2)) == [2, 3, 4, 5, 6, 7, 8]
    assert view_channels(CHANNELS, (2, 0)) == [5, 6, 7, 8, 0, 1]
    with pytest.raises(ValueError, match="do not exist"):
        view_channels(CHANNELS, (3,))


def test_identity_view_is_the_stored_features():
    x = _raw()
    assert apply_view(x, ViewConfig(), None) is x


def test_local_aggregation_averages_the_neighbourhood_inside_the_map():
    x = _raw()
    y = apply_view(x, ViewConfig(levels=(2,), local_aggregation=3), CHANNELS)
    assert y.shape == (4, 4, 8, 8)
    torch.testing.assert_close(y[:, :, 3, 4], x[:, 5:, 2:5, 3:6].mean(dim=(2, 3)))
    torch.testing.assert_close(y[:, :, 0, 0], x[:, 5:, 0:2, 0:2].mean(dim=(2, 3)))  # corner: 4 real patches
    with pytest.raises(ValueError, match="channel counts"):
        apply_view(x, ViewConfig(levels=(2,)), None)
    with pytest.raises(ValueError, match="add up"):
        apply_view(x, ViewConfig(levels=(0,)), (2, 3))


def test_view_config_is_validated():
    with pytest.raises(ValidationError, match="odd"):
        ViewConfig(local_aggregation=2)
    with pytest.raises(ValidationError, match="distinct"):
        ViewConfig(levels=(1, 1))
    with pytest.raises(ValidationError, match="gives 2 levels"):  # the cpu profile stores strides 8 and 16
        cpu_profile().with_updates(features={"levels": (2,)})


def test_level_window_spans_native_cells():
    # lite0 at 224 px, levels resized to 32: strides 8, 16, 32 have 28, 14, 7 native cells
    assert native_grids({"reductions": [8, 16, 32]}, 224) == (28, 14, 7)
    assert native_grids({"channels": [2, 3]}, 224) is None  # a card from before strides were recorded
    assert [level_window(3, 32, n) for n in (112, 56, 28, 14, 7)] == [1, 1, 3, 7, 13]
    assert level_window(1, 32, 7) == 5  # one native cell of a 7 x 7 level is ~4.6 stored cells


def test_native_aggregation_matches_aggregating_before_the_resize():
    """Averaging k x k native cells then resizing ~ resizing then averaging the matching window."""
    g = torch.Generator().manual_seed(3)
    native = torch.randn(2, 4, 8, 8, generator=g)  # a level on its own 8 x 8 grid
    stored = F.interpolate(native, size=(32, 32), mode="bilinear", align_corners=False)
    x = torch.cat([torch.randn(2, 2, 32, 32, generator=g), stored], dim=1)  # levels: 2 + 4 channels
    view = ViewConfig(levels=(1,), local_aggregation=3, aggregate_at="native")
    got = apply_view(x, view, (2, 4), grids=(32, 8))
    want = F.interpolate(F.avg_pool2d(native, 3, 1, 1, count_include_pad=False), size=(32, 32), mode="bilinear",
                         align_corners=False)
    inner = (slice(None), slice(None), slice(8, 24), slice(8, 24))  # away from the border
    assert (got - want)[inner].abs().mean() < 0.25 * want[inner].abs().mean()
    # 3 x 3 stored cells is a much smaller neighbourhood: far from the native average
    small = apply_view(x, view.model_copy(update={"aggregate_at": "stored"}), (2, 4))
    assert (small - want)[inner].abs().mean() > 3 * (got - want)[inner].abs().mean()
    # each level gets its own window; all levels when levels is None
    both = apply_view(x, ViewConfig(local_aggregation=3, aggregate_at="native"), (2, 4), grids=(32, 8))
    torch.testing.assert_close(both[:, 2:], got)
    torch.testing.assert_close(both[:, :2], F.avg_pool2d(x[:, :2], 3, 1, 1, count_include_pad=False))
    with pytest.raises(ValueError, match="native grid"):
        apply_view(x, view, (2, 4))


def test_reweighted_score_matches_patchcore_formula():
    bank = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], dtype=np.float32)
    knn = knn_for(bank)
    query = np.array([[[0.1, 0.0], [3.0, 0.0]]], dtype=np.float32)  # [B=1, P=2, D=2]
    found = knn.search(query[0], 1)
    scores = reweighted_scores(query, found.distances[:, 0][None], found.indices[:, 0][None], bank, knn, 3)
    # the worst patch (3, 0) has nearest member m* = (1, 0) at distance 2; m*'s 3 nearest in the bank:
    # itself, (0, 0) and (0, 1); the weight is 1 - softmax over the distances from the patch to them
    d = np.array([2.0, 3.0, np.sqrt(10.0)])
    expected = (1 - np.exp(d[0]) / np.exp(d).sum()) * 2.0  # PatchCore eq. 7
    assert scores.shape == (1,) and scores[0] == pytest.approx(expected, rel=1e-5)


def test_patchcore_bank_size_and_maps_find_the_odd_patch():
    base = BaselineConfig(recipe="patchcore", view=ViewConfig(levels=(1, 2), local_aggregation=1), keep_rate=0.25)
    train = torch.zeros(4, 9, 8, 8) + torch.arange(8.0).view(1, 1, 1, 8) * 0.01
    bank = build_bank(train, np.array(["a", "a", "b", "b"]), base, CoresetConfig(projection_dim=4), [2, 3, 4], None, 0)
    assert bank.shape == (2 * round(0.25 * 128), 7)
    test = train[:2].clone()
    test[1, 2:, 5, 5] += 3.0  # one anomalous patch in the second image
    out = patchcore_maps(test, bank, knn_for(bank), base, CHANNELS, None, 32, 1.0)
    assert out.maps.shape == (2, 32, 32)
    assert out.scores[1] > 10 * max(float(out.scores[0]), 1e-6)
    peak = np.unravel_index(int(out.maps[1].argmax()), (32, 32))
    assert abs(peak[0] - 22) <= 3 and abs(peak[1] - 22) <= 3  # patch (5, 5) of 8 covers pixels 20-23


def _model(cfg, card=None):
    card = card or {"channels": [40, 112, 320], "reductions": [8, 16, 32]}  # lite0's stride-8, -16, -32 levels
    x = torch.randn(6, sum(card["channels"]), 8, 8, generator=torch.Generator().manual_seed(1))
    grids = native_grids(card, cfg.data.image_size)
    viewed = apply_view(x, cfg.features, card["channels"], grids)
    st = FeatureStats.fit(viewed)
    state = new_state(viewed.shape[1], 8, cfg.diffusion, 0, torch.device("cpu"))
    bank = st.apply(viewed).permute(0, 2, 3, 1).reshape(-1, viewed.shape[1]).numpy()[::5].copy()
    pc = None
    if cfg.baseline.recipe == "patchcore":
        pc = build_bank(x, np.array(["d/c"] * 6), cfg.baseline, cfg.coreset, card["channels"], grids, 0)
    return x, LafiteModel(cfg, st, state.unet.eval(), bank, ("d/c",), card, baseline_bank=pc)


def _cfg(**updates):  # three stored levels (lite0's strides 8-32), as _model's card
    return cpu_profile().with_updates(
        diffusion={"base_channels": 16, "channel_mult": (1, 2)}, backbone={"feature_size": 8, "out_indices": (2, 3, 4)},
        scoring={"ddim_steps": 2}, **updates)


def test_model_with_views_and_patchcore_bank_roundtrips():
    cfg = _cfg(features={"levels": (1, 2), "local_aggregation": 3})
    x, model = _model(cfg)
    assert model.feature_dim == 432 and model.baseline_bank.shape[1] == 152
    assert model.grids == (28, 14, 7)
    files = model.to_files()
    again = LafiteModel.from_files(files)
    np.testing.assert_array_equal(again.baseline_bank, model.baseline_bank)
    for method in ("lafite", "lafite_no_edit", "patchcore"):
        a = Scorer(model, "cpu").score(x[:3], method, [1, 2, 3])
        b = Scorer(again, "cpu").score(x[:3], method, [1, 2, 3])
        torch.testing.assert_close(a.scores, b.scores)
    broken = dict(files)
    del broken[BASELINE_BANK]
    with pytest.raises(ValueError, match="incomplete"):
        LafiteModel.from_files(broken)


def test_versions_recorded_before_views_and_baselines_still_load():
    # before views and baselines: the paper's four levels, no strides on the card
    cfg = _cfg().with_updates(baseline={"recipe": "shared"}, backbone={"out_indices": (0, 1, 2, 3)},
                              features={"local_aggregation": 1})
    _, model = _model(cfg, {"channels": [16, 24, 40, 112]})
    files = {k: v for k, v in model.to_files().items() if k != BASELINE_BANK}
    meta = json.loads(files["model.json"])
    for key in ("features", "baseline"):  # as written before these sections existed
        del meta["config"][key]
    meta["config_hash"] = config_hash(meta["config"])
    files["model.json"] = json.dumps(meta).encode()
    old = LafiteModel.from_files(files)
    assert old.config.baseline.recipe == "shared" and old.config.features == ViewConfig()
    meta["config"]["seed"] = 7  # an altered config no longer matches its hash
    files["model.json"] = json.dumps(meta).encode()
    with pytest.raises(ValueError, match="hash"):
        LafiteModel.from_files(files)


def test_neighbours_searched_once_serve_every_smaller_k():
    cfg = _cfg().with_updates(baseline={"recipe": "shared"}, scoring={"batch_size": 4})  # two batches
    x, model = _model(cfg)
    scorer = Scorer(model, "cpu")
    found = scorer.neighbours(x, 5)
    assert found.indices.shape == (6 * 8 * 8, 5)
    for method, k in (("lafite", 1), ("lafite", 3), ("lafite", 5), ("patchcore", None)):
        fresh = scorer.score(x, method, list(range(6)), tau=100, k=k)
        reused = scorer.score(x, method, list(range(6)), tau=100, k=k, found=found)
        torch.testing.assert_close(reused.scores, fresh.scores)
        torch.testing.assert_close(reused.maps, fresh.maps)
    with pytest.raises(ValueError, match="patches"):
        scorer.score(x[:3], "lafite", [0, 1, 2], k=3, found=found)
    with pytest.raises(ValueError, match="K=7"):
        scorer.score(x, "lafite", list(range(6)), k=7, found=found)
