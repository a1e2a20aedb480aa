"""Evaluation of a model version on labelled test sets, fanned out across categories with Ray."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from prefect import flow

import tasks.runtime  # noqa: F401
from flows.params import EvaluateParams, new_run_id
from lafite_core.store import layout
from lafite_core.stages import CARD_FILE, CONFIG_FILE
from lafite_core.store.storage import Store
from tasks.artifacts import Settings, evaluate_artifacts, publish
from tasks.evaluation import evaluate_categories_task, stamp, write_metrics_task
from tasks.features import discover_task
from tasks.progress import run_logger
from tasks.report import evaluation_report_task


@dataclass(frozen=True)
class EvaluateOutcome:
    run_id: str
    model_version: str
    metrics_url: str
    summary_url: str
    rows: list[dict]
    report_url: str  # reports/<run_id>/index.html


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: EvaluateParams) -> EvaluateOutcome:
    """Score every labelled test image with each method; write per-category and summary tables and the report."""
    log = run_logger()
    run_id = params.run_id or new_run_id("evaluate")
    store = Store(params.store)
    version = store.resolve_version(params.model_version)
    categories = [c for c in discover_task(params.data_root, params.categories, params.layout) if c.test]
    if not categories:
        raise ValueError(f"no category under {params.data_root} has test images to evaluate on")
    log.info("evaluating model %s on %d categories", version, len(categories))
    rows = stamp(evaluate_categories_task(params.store, version, run_id, categories, list(params.methods),
                                          params.seed, params.data_root, params.ray_address), run_id, version)
    config_json = store.read_bytes(*layout.model_file(version, CONFIG_FILE)).decode()
    urls = write_metrics_task(params.store, run_id, version, rows, config_json)
    report = evaluation_report_task(params.store, run_id)
    outcome = EvaluateOutcome(run_id, version, urls["metrics"], urls["summary"], rows, report)
    publish(partial(evaluate_artifacts, run_id, version, rows,
                    Settings.from_card(store.read_json(*layout.model_file(version, CARD_FILE))),
                    evaluation_links(outcome, store.url(*layout.model_dir(version)))))
    return outcome


def evaluation_links(outcome: EvaluateOutcome, model_url: str) -> list[tuple[str, str]]:
    """Where an evaluation's outputs are, for its artifacts (and those of the training run that ran it)."""
    return [("report", outcome.report_url), ("metrics table", outcome.metrics_url),
            ("summary table", outcome.summary_url), (f"model version {outcome.model_version}", model_url)]
