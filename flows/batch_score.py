"""Batch scoring of an image dump (folder or s3:// prefix) with the latest or a named model version."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from prefect import flow

import tasks.runtime  # noqa: F401
from flows.params import ScoreParams, new_run_id
from lafite_core.report.counts import BatchCounts, CategoryCounts
from lafite_core.store import layout
from lafite_core.store.storage import Store
from tasks.artifacts import batch_artifacts, publish
from tasks.progress import run_logger
from tasks.report import batch_report_task
from tasks.scoring import merge_scores_task, score_shards_task


@dataclass(frozen=True)
class ScoreOutcome:
    run_id: str
    model_version: str
    table_url: str | None
    listed: int
    scored: int
    skipped: int
    errors: int
    report_url: str  # reports/<run_id>/index.html
    categories: tuple[CategoryCounts, ...]  # the counts per category


@flow(name="batch_score", log_prints=True)
def batch_score_flow(params: ScoreParams) -> ScoreOutcome:
    """Score every image under ``source`` not yet scored by this model version; one table and report per run."""
    log = run_logger()
    run_id = params.run_id or new_run_id("score")
    store = Store(params.store)
    version = store.resolve_version(params.model_version)
    log.info("run %s: scoring the images under %s with model %s, listed page by page", run_id, params.source,
             version)
    done = score_shards_task(params.store, version, run_id, params.source.rstrip("/"), params.method,
                             params.heatmaps, params.shard_size, params.ray_address)
    table = merge_scores_task(params.store, version, run_id, params.stale_after_s)
    counts = BatchCounts(version, done.listed, done.scored, done.skipped, done.errors)
    report = batch_report_task(params.store, run_id, counts)
    log.info("scored %d, skipped %d already scored, %d errors; table: %s", counts.scored, counts.skipped,
             counts.errors, table or "(nothing new)")
    categories = done.categories
    publish(partial(batch_artifacts, run_id, counts, categories,
                    [("report", report), ("score table", table),
                     (f"model version {version}", store.url(*layout.model_dir(version)))]))
    return ScoreOutcome(run_id, version, table, counts.listed, counts.scored, counts.skipped, counts.errors, report,
                        categories)
