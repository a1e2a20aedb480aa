"""Data-parallel U-Net training (``train.workers`` = 2, Ray Train, gloo on 2 CPU workers)."""

from __future__ import annotations

import numpy as np
import torch

from flows.params import TrainParams
from lafite_core.datapath.data import discover
from lafite_core.method.backbone import FeatureExtractor
from lafite_core.method.coreset import patch_bank
from lafite_core.method.model import LafiteModel, Scorer
from lafite_core.stages import backbone_card, plan_training, training_view
from lafite_core.store import layout
from lafite_core.store.feature_store import FeatureStore, extract_into, read_training_features
from lafite_core.store.storage import Store


def test_two_cpu_workers_train_a_model_that_scores_with_a_bank_over_every_category(
        small_demo, tiny_overrides, tmp_path, fresh_ray):
    import tasks.runtime as runtime
    from tasks.training import train_task

    runtime.ray_init(num_cpus=2)
    overrides = {**tiny_overrides, "diffusion": {**tiny_overrides["diffusion"], "epochs": 2}, "train": {"workers": 2}}
    cfg = TrainParams(data_root=str(small_demo.root), overrides=overrides).config()
    assert cfg.train.workers == 2
    plan = plan_training(discover(str(small_demo.root)), cfg)
    card = backbone_card(FeatureExtractor(cfg.backbone))
    store = Store(str(tmp_path / "store"))
    extract_into(FeatureStore(store, cfg, card), plan.fit + plan.holdout, FeatureExtractor(cfg.backbone))

    ref = train_task.fn(store.root_url, cfg.to_json(), plan, "dp", card, [])
    assert ref.epochs == 2 and np.isfinite(ref.final_loss) and "Ray Train" in ref.device

    # the Ray Train checkpoints are in the store, under the run's training key
    ckpts = store.fs.glob(store.path(*layout.ray_train(ref.run_key), "**", layout.CHECKPOINT_FILE))
    assert ckpts, "no Ray Train checkpoint in the store"

    staged = layout.staged("dp", "x")[:-1]
    model = LafiteModel.from_files({n: store.read_bytes(*staged, n) for n in store.listdir(*staged)})
    holdout = read_training_features(FeatureStore(store, cfg, card), plan.holdout)
    scores = Scorer(model, "cpu").score(torch.from_numpy(holdout.raw), "lafite", list(range(len(holdout.entries)))).scores
    assert scores.shape == (len(holdout.entries),) and torch.isfinite(scores).all()

    # statistics and the coreset come from all training features, not one worker's share
    train = read_training_features(FeatureStore(store, cfg, card), plan.fit)
    normalized = model.stats.apply(training_view(train.raw, cfg, card))
    np.testing.assert_array_equal(model.bank, patch_bank(normalized, train.groups, cfg.coreset, cfg.seed))
    d = normalized.shape[1]
    bank = torch.from_numpy(model.bank)
    for category in np.unique(train.groups):
        patches = normalized[torch.from_numpy(train.groups == category)].permute(0, 2, 3, 1).reshape(-1, d)
        assert (torch.cdist(bank, patches).min(dim=1).values == 0).any(), f"no bank patch of {category}"
    assert len(np.unique(train.groups)) == 3

    # a rerun under the same training key resumes from Ray Train's last checkpoint (nothing left to train)
    again = train_task.fn(store.root_url, cfg.to_json(), plan, "dp2", card, [])
    assert (again.run_key, again.resumed_from_epoch, again.epochs) == (ref.run_key, 2, 2)
    assert store.read_bytes(*layout.staged("dp2", "unet.pt")) == store.read_bytes(*staged, "unet.pt")
