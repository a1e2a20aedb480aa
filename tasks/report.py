"""Writing a run's report (``reports/<run_id>/index.html``) at the end of its flow."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

import tasks.runtime  # noqa: F401
from lafite_core.report import batch, evaluation
from lafite_core.store.storage import Store
from tasks.progress import run_logger


@task(name="write-evaluation-report", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def evaluation_report_task(store_url: str, run_id: str) -> str:
    """The evaluation run's report, from its metrics table and evidence; returns the page's URL."""
    url = evaluation.write(Store(store_url), run_id)
    run_logger().info("evaluation report: %s", url)
    return url


@task(name="write-batch-report", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def batch_report_task(store_url: str, run_id: str, counts: batch.BatchCounts) -> str:
    """The batch run's report, from its score table and ``counts``; returns the page's URL."""
    url = batch.write(Store(store_url), counts.model_version, run_id, counts)
    run_logger().info("batch-scoring report: %s", url)
    return url
