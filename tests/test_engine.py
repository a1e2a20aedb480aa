"""One engine: the train flow and ``pipeline.fit`` compose the same stages and build the same model;
a published version records one tau, K and threshold; the U-Net checkpoint key covers only what
determines the weights."""

import json
import shutil

import numpy as np
import pytest

from flows.params import TrainParams
from lafite_core.store import layout
from lafite_core.method.backbone import FeatureExtractor
from lafite_core.config import config_hash
from lafite_core.datapath.data import discover
from lafite_core.method.model import Scorer
from lafite_core.pipeline import fit, publish
from lafite_core.stages import (
    CALIBRATION_FILE,
    CARD_FILE,
    CONFIG_FILE,
    backbone_card,
    load_published,
    plan_training,
    score_category,
    training_key,
)
from lafite_core.store.storage import Store
from tasks.training import train_body


def _config(small_demo, tiny_overrides, **updates):
    cfg = TrainParams(data_root=str(small_demo.root), overrides=tiny_overrides).config()
    return cfg.with_updates(**updates) if updates else cfg


def _agree(files: dict[str, bytes]) -> tuple[int, int, float]:
    """tau, K and threshold of a version's files, after checking every file that records them agrees."""
    model = json.loads(files["model.json"])
    config = json.loads(files[CONFIG_FILE])
    card = json.loads(files[CARD_FILE])
    calibration = json.loads(files[CALIBRATION_FILE])
    assert (model["tau"], model["k"]) == (config["scoring"]["tau"], config["scoring"]["k"]) == (card["tau"], card["k"])
    assert model["config"] == config
    assert card["threshold"] == calibration["overall"]["threshold"]
    assert card["config_hash"] == model["config_hash"]
    return card["tau"], card["k"], card["threshold"]


def test_flow_and_pipeline_build_the_same_model(trained_store, small_demo, tiny_overrides, tmp_path):
    cfg = _config(small_demo, tiny_overrides)
    store = Store(trained_store)
    (version,) = store.list_versions()
    flow_model, flow_cal, flow_files = load_published(store, version.version)

    cats = discover(str(small_demo.root))
    extractor = FeatureExtractor(cfg.backbone)
    fitted = fit(cats, cfg, extractor)
    mine = Store(str(tmp_path / "store"))
    mine_files = load_published(mine, publish(mine, fitted).version)[2]

    assert (fitted.model.tau, fitted.model.k) == (flow_model.tau, flow_model.k)
    assert fitted.model.config == flow_model.config
    assert fitted.model.bank.shape == flow_model.bank.shape
    np.testing.assert_allclose(fitted.model.bank, flow_model.bank, rtol=1e-4, atol=1e-5)
    assert fitted.selection.calibration.overall.threshold == pytest.approx(flow_cal.overall.threshold, rel=1e-4)
    assert _agree(mine_files)[:2] == _agree(flow_files)[:2]
    assert set(mine_files) == set(flow_files)
    for method in ("lafite", "patchcore"):
        a, _ = score_category(Scorer(fitted.model), extractor, cats[0], (method,))
        b, _ = score_category(Scorer(flow_model), extractor, cats[0], (method,))
        np.testing.assert_allclose(a.scores[method], b.scores[method], rtol=1e-4, atol=1e-6)


def test_published_files_agree_on_tau_k_and_threshold(trained_store):
    store = Store(trained_store)
    (version,) = store.list_versions()
    model, calibration, files = load_published(store, version.version)
    tau, k, threshold = _agree(files)
    assert (model.tau, model.k, calibration.overall.threshold) == (tau, k, threshold)
    assert json.loads(files["model.json"])["config_hash"] == config_hash(model.config) == version.config_hash
    # the search's choice, not the profile's default, is what the config records
    search = store.read_table(*layout.model_file(version.version, "search.parquet")).to_pylist()
    value = {"tau": "tau", "k": "k", "steps": "ddim_steps"}
    assert {(r["stage"], r[value[r["stage"]]]) for r in search if r["chosen"]} == {
        ("tau", tau), ("k", k), ("steps", model.config.scoring.ddim_steps)}
    # every point scored on 4 of each category's 6 or more pseudo-validation images (search.images_per_category)
    assert {r["images"] for r in search} == {4 * len(model.categories)}


def test_training_key_covers_what_determines_the_weights(small_demo, tiny_overrides):
    cfg = _config(small_demo, tiny_overrides)
    data = [("d/c/train/good/000", "ab" * 32), ("d/c/train/good/001", "cd" * 32)]
    key = training_key(cfg, data)
    same = [cfg.with_updates(scoring={"ddim_steps": 7, "tau": 100, "k": 5}), cfg.with_updates(search={"ks": (1,)}),
            cfg.with_updates(coreset={"keep_rate": 0.2}), cfg.with_updates(synthesis={"anomalies_per_normal": 3})]
    for c in same:
        assert training_key(c, data) == key
    assert training_key(cfg, list(reversed(data))) == key  # the set of images, not their order
    changed = [cfg.with_updates(diffusion={"lr": 2e-3}), cfg.with_updates(seed=1),
               cfg.with_updates(backbone={"feature_size": 16}), cfg.with_updates(data={"image_size": 192})]
    for c in changed:
        assert training_key(c, data) != key
    assert training_key(cfg, data[:1]) != key
    assert training_key(cfg, [(data[0][0], "ef" * 32), data[1]]) != key  # same name, new content


def test_changing_ddim_steps_reuses_the_trained_unet_and_changing_lr_does_not(trained_store, small_demo,
                                                                              tiny_overrides, tmp_path):
    shutil.copytree(trained_store, tmp_path / "store")
    url = str(tmp_path / "store")
    epochs = tiny_overrides["diffusion"]["epochs"]

    card = backbone_card(FeatureExtractor(_config(small_demo, tiny_overrides).backbone))

    def train(cfg, run_id):
        return train_body(url, cfg.to_json(), plan_training(discover(str(small_demo.root)), cfg), run_id, card, [],
                          "cpu")

    reused = train(_config(small_demo, tiny_overrides, scoring={"ddim_steps": 3}), "steps")
    assert reused.resumed_from_epoch == epochs and reused.epochs == epochs
    fresh = train(_config(small_demo, tiny_overrides, diffusion={**tiny_overrides["diffusion"], "lr": 5e-4}), "lr")
    assert fresh.resumed_from_epoch == 0 and fresh.epochs == epochs and fresh.run_key != reused.run_key
