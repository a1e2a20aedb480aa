import json

import numpy as np
import pytest
import torch

from lafite_core.config import cpu_profile
from lafite_core.method.model import LafiteModel, Scorer
from lafite_core.method.normalize import FeatureStats
from lafite_core.method.train import load_state, new_state, planned_epochs, train_unet


def _cfg(epochs=4):
    return cpu_profile().with_updates(
        diffusion={"base_channels": 16, "channel_mult": (1, 2), "epochs": epochs, "batch_size": 4,
                   "checkpoint_every": 2, "lr": 1e-3},
        backbone={"feature_size": 8},
    )


def _features(n=12, d=6, s=8):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, d, s, s, generator=g)
    return base + 0.1 * torch.randn(n, d, s, s, generator=g)


def test_training_lowers_loss_and_resume_equals_uninterrupted():
    cfg = _cfg(epochs=6).diffusion
    x = _features()
    full = train_unet(x, cfg, seed=1, device=torch.device("cpu"))
    assert full.epoch == 6 and len(full.losses) == 6
    assert full.losses[-1] < full.losses[0]

    saved = {}
    part = train_unet(x, cfg.model_copy(update={"epochs": 6}), seed=1, device=torch.device("cpu"),
                      on_checkpoint=lambda st: saved.setdefault(st.epoch, st.to_bytes("{}")))
    assert sorted(saved) == [2, 4, 6]
    resumed = load_state(saved[2], 6, 8, cfg, torch.device("cpu"))
    assert resumed.epoch == 2
    resumed = train_unet(x, cfg, seed=1, device=torch.device("cpu"), state=resumed)
    for (k, a), b in zip(full.unet.state_dict().items(), resumed.unet.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert resumed.losses == pytest.approx(full.losses)
    del part


def test_feature_stats_normalise_and_roundtrip():
    x = _features() * 3 + 2
    st = FeatureStats.fit(x)
    y = st.apply(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(6), atol=1e-4)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(6), atol=1e-3)
    st2 = FeatureStats.from_bytes(st.to_bytes())
    np.testing.assert_array_equal(st.mean, st2.mean)
    np.testing.assert_array_equal(st.std, st2.std)


def test_step_budget_plans_whole_epochs():
    cfg = _cfg(epochs=50).diffusion  # batch 4
    assert planned_epochs(cfg, 12) == 50
    assert planned_epochs(cfg.model_copy(update={"max_steps": 9}), 12) == 3  # 3 steps an epoch
    assert planned_epochs(cfg.model_copy(update={"max_steps": 10}), 12) == 4  # the epoch that reaches it
    assert planned_epochs(cfg.model_copy(update={"max_steps": 10_000}), 12) == 50  # epochs stay a cap
    assert planned_epochs(cfg.model_copy(update={"max_steps": 1}), 1000) == 1
    with pytest.raises(ValueError):
        planned_epochs(cfg, 0)


def test_step_budget_training_stops_drops_lr_and_resumes_exactly():
    cfg = _cfg(epochs=50).diffusion.model_copy(update={"max_steps": 15})  # 12 samples, batch 4: 5 epochs
    x = _features()
    saved = {}
    full = train_unet(x, cfg, seed=2, device=torch.device("cpu"),
                      on_checkpoint=lambda st: saved.setdefault(st.epoch, st.to_bytes("{}")))
    assert full.epoch == 5 and len(full.losses) == 5 and sorted(saved) == [2, 4, 5]
    # lr x0.1 at 80% of the planned 5 epochs, not of the 50-epoch cap
    assert full.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * 0.1)
    resumed = train_unet(x, cfg, seed=2, device=torch.device("cpu"), state=load_state(saved[2], 6, 8, cfg,
                                                                                        torch.device("cpu")))
    assert resumed.epoch == 5
    for (k, a), b in zip(full.unet.state_dict().items(), resumed.unet.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert resumed.losses == pytest.approx(full.losses)


def test_model_files_roundtrip_and_scores_agree():
    # PatchCore's own bank and LafitE's per-level view (needs a backbone card): test_views_patchcore
    cfg = _cfg().with_updates(baseline={"recipe": "shared"}, features={"levels": None, "local_aggregation": 1})
    x = _features()
    st = FeatureStats.fit(x)
    state = new_state(6, 8, cfg.diffusion, 0, torch.device("cpu"))
    bank = st.apply(x).permute(0, 2, 3, 1).reshape(-1, 6).numpy()[::7].copy()
    model = LafiteModel(cfg, st, state.unet.eval(), bank, categories=("d/c",)).with_hyperparameters(100, 3)
    files = model.to_files()
    again = LafiteModel.from_files(files)
    assert (again.tau, again.k, again.categories) == (100, 3, ("d/c",))
    np.testing.assert_array_equal(again.bank, bank)
    for method in ("lafite", "lafite_no_edit", "patchcore"):
        a = Scorer(model, "cpu").score(x[:3], method, [1, 2, 3])
        b = Scorer(again, "cpu").score(x[:3], method, [1, 2, 3])
        torch.testing.assert_close(a.scores, b.scores)
    assert model.config.scoring.tau == 100 and json.loads(files["model.json"])["config"]["scoring"]["k"] == 3
    broken = dict(files)
    del broken["bank.npy"]
    with pytest.raises(ValueError, match="incomplete"):
        LafiteModel.from_files(broken)


def test_the_calibration_reuses_the_search_point_and_its_neighbours(monkeypatch):
    """The chosen point's scores come from the search (no extra pass), and a point the search did not
    score is scored with the search's bank neighbours: identical to a fresh search of the bank."""
    from lafite_core.method.knn import FaissKNN
    from lafite_core.stages import PseudoEvaluator, PseudoValidation

    cfg = _cfg().with_updates(features={"levels": None, "local_aggregation": 1}, baseline={"recipe": "shared"},
                              search={"taus": (50, 100), "ks": (1, 3), "ddim_steps": ()}, scoring={"ddim_steps": 2})
    x = _features(n=8)
    st = FeatureStats.fit(x)
    state = new_state(6, 8, cfg.diffusion, 0, torch.device("cpu"))
    bank = st.apply(x).permute(0, 2, 3, 1).reshape(-1, 6).numpy()[::5].copy()
    model = LafiteModel(cfg, st, state.unet.eval(), bank, categories=("d/c",))
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    masks = np.zeros((8, cfg.data.image_size, cfg.data.image_size), bool)
    masks[4:, :20, :20] = True
    pseudo = PseudoValidation(x.numpy(), labels, masks, np.array(["d/c"] * 8), list(range(8)))
    ev = PseudoEvaluator(Scorer(model, "cpu"), pseudo)
    ev(100, 3, 2)
    searches = []
    real_search = FaissKNN.search
    monkeypatch.setattr(FaissKNN, "search", lambda self, q, k: searches.append(k) or real_search(self, q, k))
    calls = []
    real_score = Scorer.score
    monkeypatch.setattr(Scorer, "score", lambda self, *a, **kw: calls.append(a) or real_score(self, *a, **kw))
    tuned = model.with_hyperparameters(100, 3, 2)
    np.testing.assert_array_equal(ev.final_scores(tuned), ev.scores[(100, 3, 2)])
    assert calls == [] and searches == []
    other = model.with_hyperparameters(100, 1, 2)  # not scored by the search: scored now, bank not searched again
    got = ev.final_scores(other)
    assert len(calls) == 1 and searches == []
    monkeypatch.undo()
    fresh = Scorer(other, "cpu").score(torch.from_numpy(pseudo.features), "lafite", pseudo.seeds).scores.numpy()
    np.testing.assert_allclose(got, fresh, rtol=1e-5, atol=1e-6)


def test_a_search_subset_scores_its_images_and_the_calibration_scores_only_the_rest(monkeypatch):
    """With search.images_per_category the points are scored on the subset (metrics on it alone), and
    the chosen point's scores of the whole set are the subset's plus the rest scored once: the same as
    one pass over the whole set."""
    from lafite_core.method.metrics import auroc
    from lafite_core.stages import PseudoEvaluator, PseudoValidation, search_subset

    cfg = _cfg().with_updates(features={"levels": None, "local_aggregation": 1}, baseline={"recipe": "shared"},
                              search={"taus": (50, 100), "ks": (1, 3), "ddim_steps": ()}, scoring={"ddim_steps": 2},
                              compute={"precision": "fp32"})
    x = _features(n=12)
    st = FeatureStats.fit(x)
    state = new_state(6, 8, cfg.diffusion, 0, torch.device("cpu"))
    bank = st.apply(x).permute(0, 2, 3, 1).reshape(-1, 6).numpy()[::5].copy()
    model = LafiteModel(cfg, st, state.unet.eval(), bank, categories=("d/c",))
    labels = np.array([0] * 6 + [1] * 6)
    masks = np.zeros((12, cfg.data.image_size, cfg.data.image_size), bool)
    masks[6:, :20, :20] = True
    pseudo = PseudoValidation(x.numpy(), labels, masks, np.array(["d/c"] * 12), list(range(12)))
    subset = search_subset(labels, pseudo.categories, 6, seed=0)
    assert len(subset) == 6 and labels[subset].sum() == 3
    ev = PseudoEvaluator(Scorer(model, "cpu"), pseudo, subset=subset)
    img, _ = ev(100, 3, 2)
    feats = torch.from_numpy(pseudo.features)
    fresh = Scorer(model, "cpu").score(feats, "lafite", pseudo.seeds, tau=100, k=3, steps=2).scores.numpy()
    np.testing.assert_allclose(ev.scores[(100, 3, 2)], fresh[subset], rtol=1e-5, atol=1e-6)
    assert img == pytest.approx(auroc(labels[subset], fresh[subset]))
    calls = []
    real_score = Scorer.score
    monkeypatch.setattr(Scorer, "score", lambda self, raw, *a, **kw: calls.append(raw.shape[0]) or real_score(
        self, raw, *a, **kw))
    got = ev.final_scores(model.with_hyperparameters(100, 3, 2))
    assert calls == [6]  # only the six images outside the subset
    np.testing.assert_array_equal(got[subset], ev.scores[(100, 3, 2)])
    np.testing.assert_allclose(got, fresh, rtol=1e-5, atol=1e-6)
    calls.clear()
    other = model.with_hyperparameters(50, 1, 2)  # not scored by the search: the whole set scored now
    np.testing.assert_allclose(ev.final_scores(other), real_score(Scorer(other, "cpu"), feats, "lafite", pseudo.seeds)
                               .scores.numpy(), rtol=1e-5, atol=1e-6)
    assert calls == [12]
