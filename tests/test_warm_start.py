"""Warm start: which parent versions fit a config (and why not), fine-tuning from the parent's U-Net for
a fraction of the budget under its own checkpoint key, resuming it after a crash, and the model card."""

import dataclasses
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from flows.cli import build_parser
from flows.params import TrainParams
from lafite_core.config import cpu_profile
from lafite_core.datapath.data import Sample, discover
from lafite_core.method.backbone import FeatureExtractor
from lafite_core.method.precision import resolve_precision
from lafite_core.method.train import planned_epochs, train_unet
from lafite_core.pipeline import fit, publish
from lafite_core.method.coreset import BankSources, patch_bank
from lafite_core.stages import (
    CARD_FILE,
    backbone_card,
    lafite_bank,
    merge_refusal,
    plan_training,
    split_holdout,
    train_model,
    training_key,
    training_view,
)
from lafite_core.store import layout
from lafite_core.store.feature_store import (
    FeatureEntry,
    FeatureStore,
    TrainingFeatures,
    extract_into,
    read_training_features,
)
from lafite_core.store.losses import read_losses
from lafite_core.store.storage import Store
from lafite_core.warm_start import (
    WarmStart,
    choose_parent,
    incompatibility,
    load_warm_start,
    training_budget,
    warm_start_from,
)
from tasks.training import train_body

PROJECT = Path(__file__).resolve().parents[1]


def _config(root, overrides, **updates):
    cfg = TrainParams(data_root=str(root), overrides=overrides).config()
    return cfg.with_updates(**updates) if updates else cfg


# --------------------------------------------------------------------------- the decision


def test_compatible_configs_and_the_reasons_when_not():
    cfg = cpu_profile()
    for same in (cfg.with_updates(diffusion={"lr": 1e-4, "max_steps": 300, "warm_start_fraction": 0.5}),
                 cfg.with_updates(scoring={"tau": 100, "k": 5}), cfg.with_updates(coreset={"keep_rate": 0.05}),
                 cfg.with_updates(seed=3), cfg.with_updates(baseline={"keep_rate": 0.02})):
        assert incompatibility(cfg, same) is None

    backbone = incompatibility(cfg, cfg.with_updates(backbone={"name": "tf_efficientnet_lite1"}))
    assert "feature key" in backbone and "backbone.name 'tf_efficientnet_lite0' -> 'tf_efficientnet_lite1'" in backbone
    size = incompatibility(cfg, cfg.with_updates(data={"image_size": 256}))
    assert "feature key" in size and "data.image_size 224 -> 256" in size
    crop = incompatibility(cfg, cfg.with_updates(data={"center_crop": 0.875}))
    assert "feature key" in crop and "data.center_crop 1.0 -> 0.875" in crop and "image_size" not in crop
    view = incompatibility(cfg, cfg.with_updates(features={"levels": (0,)}))
    assert "view of the features" in view and "features.levels [0, 1] -> [0]" in view and "feature key" not in view
    shape = incompatibility(cfg, cfg.with_updates(diffusion={"base_channels": 128, "channel_mult": (1, 2)}))
    assert "U-Net shape" in shape and "diffusion.base_channels 64 -> 128" in shape
    assert "diffusion.channel_mult [1, 2, 2] -> [1, 2]" in shape and "feature key" not in shape
    both = incompatibility(cfg, cfg.with_updates(data={"image_size": 256}, diffusion={"timesteps": 500}))
    assert "feature key" in both and "diffusion.timesteps 1000 -> 500" in both


def test_training_budget_is_the_fraction_of_epochs_and_steps():
    d = cpu_profile().diffusion  # 150 epochs, 1,100 steps, batch 16, warm start 10%
    assert training_budget(d, None) is d
    warm = training_budget(d, object())
    assert (warm.epochs, warm.max_steps) == (15, 110)
    assert planned_epochs(warm, 1600) == 2 and planned_epochs(d, 1600) == 11  # 100 steps an epoch
    assert planned_epochs(warm, 32) == 15 and planned_epochs(d, 32) == 150  # the epoch cap binds
    quarter = training_budget(d.model_copy(update={"warm_start_fraction": 0.25}), object())
    assert (quarter.epochs, quarter.max_steps) == (38, 275)  # rounded up
    tiny = d.model_copy(update={"epochs": 2, "max_steps": None, "warm_start_fraction": 0.1})
    assert (training_budget(tiny, object()).epochs, training_budget(tiny, object()).max_steps) == (1, None)
    with pytest.raises(ValueError):
        cpu_profile().with_updates(diffusion={"warm_start_fraction": 0})


def test_train_unet_starts_from_the_initial_weights():
    cfg = cpu_profile().diffusion.model_copy(update={"base_channels": 16, "channel_mult": (1, 2), "epochs": 1,
                                                     "max_steps": None, "batch_size": 4, "lr": 1e-9})
    x = torch.randn(8, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    parent = train_unet(x, cfg.model_copy(update={"lr": 1e-3, "epochs": 3}), seed=5, device=torch.device("cpu"))
    weights = {k: v.clone() for k, v in parent.unet.state_dict().items()}
    fresh = train_unet(x, cfg, seed=0, device=torch.device("cpu"))
    warm = train_unet(x, cfg, seed=0, device=torch.device("cpu"), initial=weights)
    moved = [k for k, v in weights.items() if not torch.allclose(fresh.unet.state_dict()[k], v, atol=1e-5)]
    assert moved  # a fresh initialisation is elsewhere
    for k, v in warm.unet.state_dict().items():  # lr 1e-9: one epoch leaves the parent's weights in place
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0, msg=k)
    assert warm.losses[0] < fresh.losses[0]


def test_the_held_out_split_is_per_image_so_added_images_move_no_earlier_one():
    cfg = cpu_profile()  # holds out 20%, at least 2

    def samples(n, category="c"):
        return [Sample(f"/d/{category}/train/good/{i:04d}.png", "d", category, "train", "good") for i in range(n)]

    fit0, hold0 = split_holdout(samples(500), cfg, 0)
    assert 70 <= len(hold0) <= 130 and len(fit0) + len(hold0) == 500  # about 20%
    fit1, hold1 = split_holdout(samples(550), cfg, 0)
    assert set(fit0) <= set(fit1) and set(hold0) <= set(hold1)  # the 50 new images fall on either side
    assert split_holdout(samples(500), cfg, 1)[1] != hold0  # another seed, another draw
    assert split_holdout(samples(500, "other"), cfg, 0)[1] != hold0  # each image its own draw
    small_fit, small_hold = split_holdout(samples(6), cfg, 0)
    assert len(small_hold) >= 2 and len(small_fit) >= 2
    bigger_fit, _ = split_holdout(samples(7), cfg, 0)
    assert set(small_fit) <= set(bigger_fit)  # the lowest draws stay held out as the category grows
    assert split_holdout(samples(3), cfg, 0) == (samples(3), [])  # too small to hold out two


# --------------------------------------------------------------------------- against a store


@pytest.fixture(scope="module")
def parent_store(tmp_path_factory, small_demo, tiny_overrides) -> tuple[str, str]:
    """A store with one version fitted in process on 5 of the 6 train images per category (the
    features stay in its Zarr store), and that version's name."""
    cfg = _config(small_demo.root, tiny_overrides)
    cats = [dataclasses.replace(c, train=c.train[:5]) for c in discover(str(small_demo.root))]
    extractor = FeatureExtractor(cfg.backbone)
    store = Store(str(tmp_path_factory.mktemp("parent") / "store"))
    fitted = fit(cats, cfg, extractor, sink=FeatureStore(store, cfg, backbone_card(extractor)))
    version = publish(store, fitted).version
    card = json.loads(store.load_model_file(version, CARD_FILE))
    assert card["parent_version"] is None and card["warm_start_fraction"] is None
    return store.root_url, version


def _copy(src: str, tmp_path) -> str:
    shutil.copytree(src, tmp_path / "store")
    return str(tmp_path / "store")


def test_choose_parent_latest_named_none_and_incompatible(parent_store, small_demo, tiny_overrides, tmp_path, caplog):
    url, version = parent_store
    store = Store(url)
    cfg = _config(small_demo.root, tiny_overrides, diffusion={**tiny_overrides["diffusion"], "lr": 5e-4})
    assert choose_parent(store, "latest", cfg) == version
    assert choose_parent(store, version, cfg) == version
    assert choose_parent(store, "none", cfg) is None

    wider = _config(small_demo.root, tiny_overrides, diffusion={**tiny_overrides["diffusion"], "base_channels": 32})
    with caplog.at_level(logging.INFO, logger="lafite_core.warm_start"):
        assert choose_parent(store, "latest", wider) is None
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "diffusion.base_channels 16 -> 32" in warning[0].getMessage()
    assert "training from scratch" in warning[0].getMessage()
    with pytest.raises(ValueError, match="does not fit this config: another U-Net shape"):
        choose_parent(store, version, wider)
    with pytest.raises(ValueError, match="no complete model version of that name"):
        choose_parent(store, "v-no-such-version", cfg)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lafite_core.warm_start"):
        assert warm_start_from(Store(str(tmp_path / "empty")), "latest", cfg) is None
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "no earlier model version" in caplog.records[0].getMessage()


def _extract(store_url: str, cfg, plan, card: dict) -> None:
    """Features of every planned image into the store (the parent's are there: only new ones run)."""
    extract_into(FeatureStore(Store(store_url), cfg, card), plan.fit + plan.holdout, FeatureExtractor(cfg.backbone))


def _staged(store_url: str, run_id: str, name: str) -> bytes:
    return Store(store_url).read_bytes(*layout.staged(run_id, name))


class Crash(Exception):
    """Stands for the process dying after a checkpoint was written."""


def test_warm_start_fine_tunes_the_fraction_under_its_own_key_and_resumes(parent_store, small_demo, tiny_overrides,
                                                                           tmp_path):
    url, version = parent_store
    a, b = _copy(url, tmp_path / "a"), _copy(url, tmp_path / "b")
    cfg = _config(small_demo.root, tiny_overrides)  # 8 epochs; a warm start trains 25%: 2
    plan = plan_training(discover(str(small_demo.root)), cfg)  # all 6 images per category: 4 fit, 2 held out
    card = backbone_card(FeatureExtractor(cfg.backbone))
    for s in (a, b):
        _extract(s, cfg, plan, card)

    warm = train_body(a, cfg.to_json(), plan, "warm", card, [], "cpu", version)
    scratch = train_body(a, cfg.to_json(), plan, "scratch", card, [], "cpu")
    assert (warm.parent_version, warm.summary["parent_version"], warm.summary["warm_start_fraction"]) == (
        version, version, 0.25)
    assert (scratch.parent_version, scratch.summary["parent_version"], scratch.summary["warm_start_fraction"],
            scratch.summary["coreset_merge"]) == (None, None, None, None)
    assert warm.train_images == scratch.train_images == 12  # fine-tuned over all current features
    budget = training_budget(cfg.diffusion, load_warm_start(Store(a), version))
    assert warm.epochs == planned_epochs(budget, 12) == 2 and scratch.epochs == 8
    assert scratch.resumed_from_epoch == 0  # the warm start's checkpoint is not a from-scratch one
    data = [(e.id, e.content_hash) for e in read_training_features(FeatureStore(Store(a), cfg, card), plan.fit).entries]
    precision = resolve_precision(cfg.compute.precision, "cpu")
    assert warm.run_key == training_key(cfg, data, precision, version) != scratch.run_key == training_key(
        cfg, data, precision)
    warm_losses = read_losses(_staged(a, "warm", layout.LOSSES_FILE))
    scratch_losses = read_losses(_staged(a, "scratch", layout.LOSSES_FILE))
    assert len(warm_losses) == 2 and warm_losses[0] < scratch_losses[0]  # it starts where the parent ended

    # b: the same warm start dies after its first epoch's checkpoint; the rerun resumes from that one
    store_b = Store(b)
    features = read_training_features(FeatureStore(store_b, cfg, card), plan.fit)
    ckpt = layout.checkpoint(training_key(cfg, data, precision, version))

    def crash(state):
        store_b.write_bytes(ckpt, state.to_bytes(cfg.to_json()))
        raise Crash

    with pytest.raises(Crash):
        train_model(features, cfg, plan.category_keys, card, "cpu", on_checkpoint=crash,
                    warm_start=load_warm_start(store_b, version))
    resumed = train_body(b, cfg.to_json(), plan, "resumed", card, [], "cpu", version)
    assert (resumed.resumed_from_epoch, resumed.epochs, resumed.run_key) == (1, 2, warm.run_key)
    x, y = (torch.load(io.BytesIO(_staged(s, run, "unet.pt")), weights_only=True) for s, run in
            ((a, "warm"), (b, "resumed")))
    for k in x:
        torch.testing.assert_close(x[k], y[k], msg=k)  # the resumed warm start equals the uninterrupted one
    assert read_losses(_staged(b, "resumed", layout.LOSSES_FILE)) == pytest.approx(warm_losses)
    assert _staged(a, "warm", "bank.npy") == _staged(b, "resumed", "bank.npy")


def test_pipeline_fit_warm_starts_and_the_card_names_the_parent(parent_store, small_demo, tiny_overrides, tmp_path):
    url, version = parent_store
    store = Store(_copy(url, tmp_path))
    cfg = _config(small_demo.root, tiny_overrides)
    extractor = FeatureExtractor(cfg.backbone)
    fitted = fit(discover(str(small_demo.root)), cfg, extractor, sink=FeatureStore(store, cfg, backbone_card(extractor)),
                 warm_start=warm_start_from(store, "latest", cfg))
    assert fitted.trained.parent_version == version and fitted.trained.epochs == 2
    child = publish(store, fitted).version
    card = json.loads(store.load_model_file(child, CARD_FILE))
    assert (card["parent_version"], card["warm_start_fraction"], card["trained_epochs"]) == (version, 0.25, 2)
    assert card["train_images"] == 12
    assert [v.version for v in store.list_versions()] == [version, child]
    assert choose_parent(store, "latest", cfg) == child  # the next night starts from this one

    # the coresets kept every parent row (the parent's fitted images are all still fitted) and added the new ones
    parent, mine = load_warm_start(store, version).sources, load_warm_start(store, child).sources
    keys = sorted(c.key for c in discover(str(small_demo.root)))
    for name, rows, per in (("lafite", "rows", "per_image"), ("patchcore", "baseline_rows", "baseline_per_image")):
        merge = fitted.model.extra["bank_merge"][name]
        assert (merge["merged"], merge["rebuilt"], merge["kept_rows"]) == (keys, {}, getattr(parent, rows).size)
        assert 0 < merge["selected_over_images"] < 12

        def patches(src):
            p = getattr(src, per)
            return {(src.images[r // p].tobytes(), int(r % p)) for r in getattr(src, rows)}

        assert patches(parent) < patches(mine)
    assert mine.rows.size == fitted.model.bank.shape[0] and mine.baseline_rows.size == fitted.model.baseline_bank.shape[0]
    assert mine.images.size == 12 and set(parent.images.tolist()) < set(mine.images.tolist())


def test_when_a_warm_start_cannot_merge_the_coresets():
    cfg = cpu_profile()
    sources = BankSources.of(["a"], ["h"], np.array(["d/c"]), 4, np.array([1]))
    warm = WarmStart("v1", {}, cfg, sources)
    assert merge_refusal(cfg, warm) is None
    assert merge_refusal(cfg, None) == "no warm start"
    assert merge_refusal(cfg.with_updates(coreset={"merge": False}), warm) == "coreset.merge is off"
    assert "does not record where its bank rows come from" in merge_refusal(cfg, dataclasses.replace(warm, sources=None))
    assert merge_refusal(cfg.with_updates(coreset={"keep_rate": 0.05}), warm) == "the parent's coreset settings differ"
    assert merge_refusal(cfg.with_updates(seed=1), warm) == "the parent's seed differs (0 -> 1)"
    assert merge_refusal(cfg, dataclasses.replace(warm, config=cfg.with_updates(coreset={"merge": False}))) is None


def test_a_parent_bank_on_another_grid_is_not_merged_but_rebuilt():
    cfg = cpu_profile()
    entries = [FeatureEntry(f"d/c/train/good/{i}", "", f"h{i}", i) for i in range(6)]
    features = TrainingFeatures(np.zeros((6, 8, 4, 4), np.float32), np.array(["d/c"] * 6), entries)
    x = torch.randn(6, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    sources = BankSources.of([e.id for e in entries], [e.content_hash for e in entries], features.groups, 9,
                             np.array([0, 10, 20]))  # a 3 x 3 grid
    bank = lafite_bank(x, features, cfg, WarmStart("v1", {}, cfg, sources))
    assert bank.merge == {"not_merged": "the parent's bank has 9 patches an image, these features 16"}
    np.testing.assert_array_equal(bank.values, patch_bank(x, features.groups, cfg.coreset, cfg.seed))
    assert bank.per_image == 16 and bank.rows.size == bank.values.shape[0] == round(0.1 * 96)


def test_without_merge_a_warm_start_rebuilds_the_banks(parent_store, small_demo, tiny_overrides, tmp_path, caplog):
    url, version = parent_store
    store = Store(_copy(url, tmp_path))
    cfg = _config(small_demo.root, tiny_overrides, coreset={"merge": False})
    plan = plan_training(discover(str(small_demo.root)), cfg)
    card = backbone_card(FeatureExtractor(cfg.backbone))
    _extract(store.root_url, cfg, plan, card)
    features = read_training_features(FeatureStore(store, cfg, card), plan.fit)
    with caplog.at_level(logging.INFO, logger="lafite_core.stages"):
        trained = train_model(features, cfg, plan.category_keys, card, "cpu", warm_start=load_warm_start(store, version))
    assert trained.model.extra["bank_merge"] == {"lafite": {"not_merged": "coreset.merge is off"},
                                                 "patchcore": {"not_merged": "coreset.merge is off"}}
    assert any("not merged: coreset.merge is off" in r.getMessage() for r in caplog.records)
    normalized = trained.model.stats.apply(training_view(features.raw, cfg, card))
    np.testing.assert_array_equal(trained.model.bank, patch_bank(normalized, features.groups, cfg.coreset, cfg.seed))


def test_train_flow_warm_starts_from_latest(parent_store, small_demo, tiny_overrides, tmp_path, prefect_harness,
                                            fresh_ray):
    from flows.train import train_flow

    url, version = parent_store
    store = _copy(url, tmp_path)
    out = train_flow(TrainParams(data_root=str(small_demo.root), store=store, overrides=tiny_overrides,
                                 evaluate=False, warm_start="latest"))
    card = json.loads(Store(store).load_model_file(out.model_version, CARD_FILE))
    assert (card["parent_version"], card["warm_start_fraction"], card["trained_epochs"]) == (version, 0.25, 2)
    sources = load_warm_start(Store(store), out.model_version).sources  # published through the staged files
    for name, rows in (("lafite", sources.rows), ("patchcore", sources.baseline_rows)):
        merge = card["coreset_merge"][name]
        assert merge["rebuilt"] == {} and len(merge["merged"]) == 3 and 0 < merge["kept_rows"] < rows.size
    with pytest.raises(ValueError, match="does not fit this config"):
        train_flow(TrainParams(data_root=str(small_demo.root), store=store, evaluate=False, warm_start=version,
                               overrides={**tiny_overrides, "diffusion": {**tiny_overrides["diffusion"],
                                                                           "num_res_blocks": 2}}))


def test_cli_and_nightly_deployment_choose_the_warm_start():
    parse = build_parser().parse_args
    assert parse(["train", "--data-root", "x"]).warm_start == "none"  # the command keeps training from scratch
    assert parse(["train", "--data-root", "x", "--warm-start", "latest"]).warm_start == "latest"
    assert TrainParams(data_root="x").warm_start == "none"
    nightly = next(d for d in yaml.safe_load((PROJECT / "prefect.yaml").read_text())["deployments"]
                   if d["name"] == "nightly")
    params = TrainParams(**{**nightly["parameters"]["params"], "data_root": "x", "store": "y", "profile": "cpu"})
    assert params.warm_start == "latest"
