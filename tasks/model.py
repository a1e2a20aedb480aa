"""Hyperparameter search, threshold calibration and publication of a model version."""

from __future__ import annotations

import json
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NONE

import tasks.runtime  # noqa: F401
from lafite_core.store import layout
from lafite_core.method.backbone import FeatureExtractor
from lafite_core.method.model import MODEL_FILES, OPTIONAL_MODEL_FILES, LafiteModel
from lafite_core.method.search import SearchResult
from lafite_core.stages import CALIBRATION_FILE, SEARCH_FILE, TrainingPlan, select, selection_files, version_files
from lafite_core.store.storage import ModelVersion, Store, storage_options_from_env
from tasks.progress import LogProgress, run_logger


@dataclass(frozen=True)
class SelectionRef:
    tau: int
    k: int
    ddim_steps: int
    threshold: float
    searched: bool
    search: SearchResult  # every pseudo-validation point (none when the search is disabled)


def _staged(store: Store, run_id: str, names) -> dict[str, bytes]:
    """The staged files ``names``, plus the optional model files that were staged."""
    optional = [n for n in OPTIONAL_MODEL_FILES if store.exists(*layout.staged(run_id, n))]
    return {n: store.read_bytes(*layout.staged(run_id, n)) for n in [*names, *optional]}


@task(name="search-and-calibrate", cache_policy=NONE, retries=1, retry_delay_seconds=10)
def select_task(store_url: str, run_id: str, plan: TrainingPlan, data_root: str) -> SelectionRef:
    """Pseudo-validation search for tau then K, and the decision threshold; stages the tuned model."""
    log = run_logger()
    store = Store(store_url)
    model = LafiteModel.from_files(_staged(store, run_id, MODEL_FILES))
    selection = select(model, FeatureExtractor(model.config.backbone), plan.holdout, plan.fit,
                       storage_options_from_env(data_root), progress=LogProgress(log))
    for p in selection.search.points:
        log.info("search %s: tau=%d K=%s DDIM steps=%d -> pseudo-validation detection AUROC %.3f (%.1f s)",
                 p.stage, p.tau, p.k, p.ddim_steps, p.image_auroc, p.seconds)
    cut = selection.calibration.overall
    log.info("%s tau=%d, K=%d, DDIM steps=%d; threshold %.4f (balanced accuracy %.3f on the pseudo-validation set)",
             "chosen" if selection.searched else "search disabled: from the config", selection.model.tau,
             selection.model.k, selection.model.config.scoring.ddim_steps, cut.threshold, cut.balanced_accuracy)
    for name, data in selection_files(selection).items():
        store.write_bytes(layout.staged(run_id, name), data)
    return SelectionRef(selection.model.tau, selection.model.k, selection.model.config.scoring.ddim_steps,
                        cut.threshold, selection.searched, selection.search)


@task(name="publish-model", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def publish_task(store_url: str, run_id: str, summary: dict) -> ModelVersion:
    """Copy the staged files into a new model version; its manifest is written last."""
    store = Store(store_url)
    names = [*MODEL_FILES, SEARCH_FILE, CALIBRATION_FILE]
    if store.exists(*layout.staged(run_id, layout.LOSSES_FILE)):  # the loss curve, for the evaluation report
        names.append(layout.LOSSES_FILE)
    files = version_files(_staged(store, run_id, names), run_id, summary)
    version = store.publish_model(files, json.loads(files["model.json"])["config_hash"])
    run_logger().info("published model version %s", version.version)
    return version
