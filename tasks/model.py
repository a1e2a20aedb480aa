"""Hyperparameter search, threshold calibration and publication of a model version."""

from __future__ import annotations

import json
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NONE

import tasks.runtime  # noqa: F401
from lafite_core.backbone import FeatureExtractor
from lafite_core.config import PipelineConfig, config_hash
from lafite_core.data import Sample
from lafite_core.model import MODEL_FILES, LafiteModel
from lafite_core.pipeline import category_key, load_all, select_hyperparameters
from lafite_core.storage import ModelVersion, Store, storage_options_from_env
from lafite_core.tables import search_table
from tasks.progress import LogProgress, run_logger
from tasks.training import STAGED

SEARCH_FILE = "search.parquet"
CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class SelectionRef:
    tau: int
    k: int
    threshold: float
    searched: bool


def _staged_model(store: Store, run_id: str) -> LafiteModel:
    return LafiteModel.from_files({n: store.read_bytes("runs", run_id, STAGED, n) for n in MODEL_FILES})


@task(name="search-and-calibrate", cache_policy=NONE, retries=1, retry_delay_seconds=10)
def select_task(store_url: str, run_id: str, holdout: list[Sample], sources: list[Sample],
                data_root: str) -> SelectionRef:
    """Pseudo-validation search for tau then K, and the decision threshold; restages the model."""
    log = run_logger()
    store = Store(store_url)
    model = _staged_model(store, run_id)
    cfg = model.config
    if not cfg.search.enabled or not holdout:
        log.warning("hyperparameter search skipped (%s): using tau=%d, K=%d from the config",
                    "disabled" if not cfg.search.enabled else "no held-out images", model.tau, model.k)
        raise ValueError("a model needs the pseudo-validation set for its threshold calibration; "
                         "enable the search and give each category at least 4 train images")
    opts = storage_options_from_env(data_root)
    progress = LogProgress(log)
    hold, bad1 = load_all(holdout, cfg, opts, progress, "read held-out normals")
    src, bad2 = load_all(sources, cfg, opts, progress, "read paste sources")
    for f in bad1 + bad2:
        log.warning("unreadable image left out of the pseudo-validation set: %s", f.error)
    holdout_imgs: dict[str, list] = {}
    source_imgs: dict[str, list] = {}
    for s in hold:
        holdout_imgs.setdefault(category_key(s.sample), []).append(s.image)
    for s in src:
        source_imgs.setdefault(category_key(s.sample), []).append(s.image)
    selection = select_hyperparameters(model, FeatureExtractor(cfg.backbone), holdout_imgs, source_imgs,
                                       progress=progress)
    for p in selection.search.points:
        log.info("search %s: tau=%d K=%s -> pseudo-validation detection AUROC %.3f", p.stage, p.tau, p.k,
                 p.image_auroc)
    log.info("chosen tau=%d, K=%d; threshold %.4f (balanced accuracy %.3f on the pseudo-validation set)",
             model.tau, model.k, selection.calibration.overall.threshold,
             selection.calibration.overall.balanced_accuracy)
    for name, data in model.to_files().items():
        store.write_bytes(["runs", run_id, STAGED, name], data)
    store.write_table(["runs", run_id, STAGED, SEARCH_FILE], search_table(selection.search),
                      {"config_hash": config_hash(cfg)})
    store.write_json(["runs", run_id, STAGED, CALIBRATION_FILE], selection.calibration.to_json())
    return SelectionRef(model.tau, model.k, selection.calibration.overall.threshold, True)


@task(name="publish-model", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def publish_task(store_url: str, run_id: str, summary: dict) -> ModelVersion:
    """Copy the staged files into a new model version; its manifest is written last."""
    store = Store(store_url)
    names = [*MODEL_FILES, SEARCH_FILE, CALIBRATION_FILE]
    files = {n: store.read_bytes("runs", run_id, STAGED, n) for n in names}
    meta = json.loads(files["model.json"])
    cfg = PipelineConfig.model_validate(meta["config"])
    files["config.json"] = cfg.to_json().encode()
    card = {"run_id": run_id, "config_hash": config_hash(cfg), "tau": meta["tau"], "k": meta["k"],
            "categories": meta["categories"], "backbone": meta["backbone"], **summary}
    files["model_card.json"] = json.dumps(card, indent=2, sort_keys=True).encode()
    version = store.publish_model(files, config_hash(cfg))
    run_logger().info("published model version %s", version.version)
    return version


def load_published(store: Store, version: str) -> tuple[LafiteModel, "Calibration", dict[str, bytes]]:  # noqa: F821
    """A verified model version: the model, its calibration, and all its files."""
    from lafite_core.calibration import Calibration

    files = store.load_model_files(version)
    return LafiteModel.from_files(files), Calibration.from_json(json.loads(files[CALIBRATION_FILE])), files
