"""Nightly retraining: features into Zarr, DDIM training, coreset, search, calibration, publication."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from prefect import flow

import tasks.runtime  # noqa: F401
from flows.evaluate import EvaluateOutcome, evaluate_flow, evaluation_links
from flows.params import EvaluateParams, TrainParams, new_run_id
from lafite_core.config import config_hash
from lafite_core.stages import plan_training
from lafite_core.store import layout
from lafite_core.store.storage import Store
from tasks.artifacts import Settings, publish, train_artifacts
from tasks.features import discover_task, extract_features_task
from tasks.model import publish_task, select_task
from tasks.progress import run_logger
from tasks.training import train_task, warm_start_task


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    model_version: str
    store: str
    tau: int
    k: int
    ddim_steps: int
    threshold: float
    evaluation: EvaluateOutcome | None


@flow(name="train", log_prints=True)
def train_flow(params: TrainParams) -> TrainOutcome:
    """Train one unified model on every category's train/good images and publish it as a version
    (from scratch, or fine-tuning a compatible earlier version's U-Net: ``params.warm_start``)."""
    log = run_logger()
    cfg = params.config()
    run_id = params.run_id or new_run_id("train")
    log.info("run %s: profile %s, config %s, store %s", run_id, params.profile, config_hash(cfg), params.store)
    plan = plan_training(discover_task(params.data_root, params.categories, params.layout), cfg)
    parent = warm_start_task(params.store, cfg.to_json(), params.warm_start)
    extraction = extract_features_task(params.store, cfg.to_json(), plan.fit + plan.holdout, params.data_root)
    trained = train_task(params.store, cfg.to_json(), plan, run_id, extraction.backbone,
                         list(extraction.report.failures), params.device, params.ray_address, parent)
    selection = select_task(params.store, run_id, plan, params.data_root)
    version = publish_task(params.store, run_id, trained.summary)
    evaluation = None
    labelled = [c for c in plan.categories if c.test]
    if params.evaluate and labelled:
        evaluation = evaluate_flow(EvaluateParams(
            data_root=params.data_root, layout=params.layout, categories=params.categories,
            model_version=version.version,
            store=params.store, ray_address=params.ray_address, run_id=f"{run_id}-eval", seed=params.seed,
        ))
    model_url = Store(params.store).url(*layout.model_dir(version.version))
    links = (evaluation_links(evaluation, model_url) if evaluation
             else [(f"model version {version.version}", model_url)])  # a report comes with an evaluation
    publish(partial(train_artifacts, run_id, version.version,
                    Settings(selection.tau, selection.k, selection.ddim_steps, selection.threshold), trained.summary,
                    selection.search, evaluation.rows if evaluation else None, links))
    return TrainOutcome(run_id, version.version, params.store, selection.tau, selection.k, selection.ddim_steps,
                        selection.threshold, evaluation)
