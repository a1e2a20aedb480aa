"""scoring.position_norm: LafitE's errors standardised per map position by held-out normal images."""

import dataclasses

import numpy as np
import pytest
import torch

from lafite_core.method.model import POSITION_STATS, LafiteModel, Scorer
from lafite_core.method.normalize import FeatureStats
from lafite_core.method.scoring import (
    POSITION_STD_FLOOR,
    fit_position_stats,
    position_normalized_scores,
    standardize_positions,
    to_anomaly_maps,
)
from lafite_core.method.train import new_state
from test_train_model import _cfg, _features


def test_position_stats_are_each_positions_mean_and_floored_std():
    g = torch.Generator().manual_seed(0)
    errors = 2.0 + torch.randn(20, 4, 4, generator=g) * torch.linspace(0.5, 2.0, 16).view(4, 4)
    errors[:, 0, 0] = 3.0  # no spread at all at one position
    stats = fit_position_stats(errors)
    assert stats.shape == (2, 4, 4) and stats.dtype == torch.float32
    torch.testing.assert_close(stats[0], errors.mean(0))
    spread = errors.std(0)
    floor = POSITION_STD_FLOOR * float(spread.mean())
    assert float(stats[1, 0, 0]) == pytest.approx(floor)  # floored, not 0
    torch.testing.assert_close(stats[1, 1:], spread[1:].clamp_min(floor))
    z = standardize_positions(errors, stats)
    torch.testing.assert_close(z[:, 1:].mean(0), torch.zeros(3, 4), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="at least 2"):
        fit_position_stats(errors[:1])
    with pytest.raises(ValueError, match="features changed"):
        standardize_positions(torch.zeros(1, 8, 8), stats)


def test_calibration_scores_leave_each_normal_image_out_of_its_own_statistics():
    g = torch.Generator().manual_seed(1)
    errors = torch.rand(9, 8, 8, generator=g)
    normal = torch.tensor([True] * 6 + [False] * 3)
    stats, scores = position_normalized_scores(errors, normal, 32, 2.0, 8)
    torch.testing.assert_close(stats, fit_position_stats(errors[:6]))
    own = to_anomaly_maps(standardize_positions(errors, stats), 32, 2.0, 8).scores
    torch.testing.assert_close(scores[6:], own[6:])  # the anomalies: all normal images' statistics
    others = fit_position_stats(errors[1:6])  # normal image 0: the other five's
    torch.testing.assert_close(scores[0], to_anomaly_maps(standardize_positions(errors[:1], others), 32, 2.0, 8)
                               .scores[0])
    assert not torch.allclose(scores[:6], own[:6])  # in-sample statistics would score them differently


def _model(position_stats=None):
    cfg = _cfg().with_updates(baseline={"recipe": "shared"}, features={"levels": None, "local_aggregation": 1},
                              scoring={"position_norm": True, "ddim_steps": 2}, compute={"precision": "fp32"})
    x = _features()
    st = FeatureStats.fit(x)
    state = new_state(6, 8, cfg.diffusion, 0, torch.device("cpu"))
    bank = st.apply(x).permute(0, 2, 3, 1).reshape(-1, 6).numpy()[::7].copy()
    model = LafiteModel(cfg, st, state.unet.eval(), bank, categories=("d/c",)).with_hyperparameters(100, 3, 2)
    return (model if position_stats is None else dataclasses.replace(model, position_stats=position_stats)), x


def test_scorer_standardises_lafite_errors_with_the_models_statistics_and_they_travel_with_it():
    plain, x = _model()
    scorer = Scorer(plain, "cpu")
    errors = scorer.feature_errors(x, list(range(12)))
    assert errors.shape == (12, 8, 8)
    stats = fit_position_stats(errors[:8]).numpy()
    model, _ = _model(stats)
    size, sc = model.config.data.image_size, model.config.scoring
    got = Scorer(model, "cpu").score(x[8:], "lafite", list(range(8, 12)))
    want = to_anomaly_maps(standardize_positions(errors[8:], torch.from_numpy(stats)), size, sc.smoothing_sigma,
                           sc.image_pool)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got.scores, Scorer(plain, "cpu").score(x[8:], "lafite", list(range(8, 12))).scores)
    # the other methods are not standardised
    torch.testing.assert_close(Scorer(model, "cpu").score(x[8:], "patchcore", [0] * 4).scores,
                               Scorer(plain, "cpu").score(x[8:], "patchcore", [0] * 4).scores)
    files = model.to_files()
    assert POSITION_STATS in files
    np.testing.assert_array_equal(LafiteModel.from_files(files).position_stats, stats)
    del files[POSITION_STATS]
    assert LafiteModel.from_files(files).position_stats is None  # a model before the search (staged) has none
    from lafite_core.stages import SEARCH_FILE, CALIBRATION_FILE, version_files
    with pytest.raises(ValueError, match="cannot publish.*position_stats"):  # a version must have them
        version_files({**files, SEARCH_FILE: b"", CALIBRATION_FILE: b"{}"}, "run", {})
    with pytest.raises(ValueError, match="fitted at tau=100"):  # another point needs its own statistics
        Scorer(model, "cpu").score(x[:2], "lafite", [0, 1], tau=50)
    assert model.with_hyperparameters(50, 3).position_stats is None


def test_select_fits_the_statistics_at_the_chosen_point_and_calibrates_with_them():
    from lafite_core.stages import PseudoEvaluator, PseudoValidation, with_position_stats

    model, x = _model()
    labels = np.array([0] * 8 + [1] * 4)
    masks = np.zeros((12, model.config.data.image_size, model.config.data.image_size), bool)
    pseudo = PseudoValidation(x.numpy(), labels, masks, np.array(["d/c"] * 12), list(range(12)))
    ev = PseudoEvaluator(Scorer(model, "cpu"), pseudo)
    errors = ev.final_errors(model)
    torch.testing.assert_close(errors, Scorer(model, "cpu").feature_errors(x, list(range(12))), rtol=1e-5, atol=1e-5)
    tuned, scores = with_position_stats(model, errors, labels)
    np.testing.assert_allclose(tuned.position_stats, fit_position_stats(errors[:8]).numpy())
    # an anomaly's calibration score is what the published model gives it
    np.testing.assert_allclose(scores[8:], Scorer(tuned, "cpu").score(x[8:], "lafite", list(range(8, 12)))
                               .scores.numpy(), rtol=1e-4, atol=1e-4)
