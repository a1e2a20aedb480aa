"""Scoring labelled test sets, one Ray task per category, and writing the metric tables."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone

from prefect import task
from prefect.cache_policies import NONE

import tasks.runtime as runtime
from lafite_core.store import layout
from lafite_core.method.backbone import FeatureExtractor
from lafite_core.datapath.data import Category
from lafite_core.method.model import Scorer
from lafite_core.report.evidence import collect
from lafite_core.stages import load_published, measure, score_category
from lafite_core.store.storage import Store, storage_options_from_env
from lafite_core.store.tables import SUMMARY_SCHEMA, metrics_table, summarize_metrics
from tasks.progress import LogProgress, run_logger, worker_logger


def evaluate_category_body(store_url: str, version: str, run_id: str, category: Category, methods: list[str],
                           seed: int | None, data_root: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """On a Ray worker: score one category's test set with every method; metric rows and failures.

    What the run's report needs of the category (scores, pixel curves, gallery) goes to the store.
    """
    log = worker_logger("lafite.evaluate")
    runtime.use_assigned_cpus()
    store = Store(store_url)
    model, calibration, _ = load_published(store, version)
    cs, failures = score_category(Scorer(model), FeatureExtractor(model.config.backbone), category, methods,
                                  storage_options_from_env(data_root), LogProgress(log))
    rows = measure(cs, methods, model.config, len(failures), seed)
    store.write_bytes(layout.evidence(run_id, category.dataset, category.name),
                      collect(cs, calibration.method).to_bytes())
    return [r.record() for r in rows], [(f.sample.url, f.error) for f in failures]


@task(name="evaluate-categories", cache_policy=NONE, retries=1, retry_delay_seconds=10)
def evaluate_categories_task(store_url: str, version: str, run_id: str, categories: list[Category],
                             methods: list[str], seed: int | None, data_root: str,
                             ray_address: str | None = None) -> list[dict]:
    """Fan out across categories with Ray; rows in category order."""
    import ray

    log = run_logger()
    runtime.ray_init(ray_address)
    remote = ray.remote(num_cpus=1)(evaluate_category_body)
    refs = [remote.remote(store_url, version, run_id, c, methods, seed, data_root) for c in categories]
    rows: list[dict] = []
    for c, (cat_rows, failures) in zip(categories, ray.get(refs)):
        for url, error in failures:
            log.warning("%s: unreadable test image left out: %s (%s)", c.key, url, error)
        for r in cat_rows:
            log.info("%s %-15s image AUROC %.3f  pixel AUROC %s  AUPRO %s", c.key, r["method"], r["image_auroc"],
                     "-" if r["pixel_auroc"] is None else f"{r['pixel_auroc']:.3f}",
                     "-" if r["aupro"] is None else f"{r['aupro']:.3f}")
        rows += cat_rows
    return rows


def stamp(rows: list[dict], run_id: str, version: str) -> list[dict]:
    """Metric rows with the run id, model version and creation time of the table they go into."""
    created = datetime.now(timezone.utc)
    return [{**r, "run_id": run_id, "model_version": version, "created": created} for r in rows]


@task(name="write-metrics", cache_policy=NONE, retries=3, retry_delay_seconds=5)
def write_metrics_task(store_url: str, run_id: str, version: str, full: list[dict], config_json: str) -> dict[str, str]:
    """Per-category and summary tables (rows already stamped) as Parquet; returns their URLs."""
    import pyarrow as pa

    store = Store(store_url)
    created = full[0]["created"] if full else datetime.now(timezone.utc)
    meta = {"config": config_json, "config_hash": full[0]["config_hash"] if full else ""}
    store.write_table(layout.metrics_table(run_id), metrics_table(full), meta)
    summary = [{**asdict(s), "run_id": run_id, "model_version": version, "created": created}
               for s in summarize_metrics(full)]
    store.write_table(layout.summary_table(run_id), pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA),
                      meta)
    urls = {"metrics": store.url(*layout.metrics_table(run_id)), "summary": store.url(*layout.summary_table(run_id))}
    run_logger().info("metrics written to %s", urls["metrics"])
    return urls
