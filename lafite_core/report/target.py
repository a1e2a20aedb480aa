"""Which run a report name means, and the report written for it.

A name is an evaluation run (it has a metrics table), a batch-scoring run (it has a score table or a
report with counts), or a model version (its latest evaluation run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from lafite_core.report import batch, evaluation
from lafite_core.store import layout
from lafite_core.store.storage import Store, safe_part


@dataclass(frozen=True)
class ReportTarget:
    kind: Literal["evaluation", "batch"]
    run_id: str
    model_version: str


def latest_evaluation(store: Store, version: str) -> str | None:
    """The run id of the newest evaluation of model ``version``; None when it was never evaluated."""
    best: tuple = ()
    for name in store.listdir(*layout.metrics_tables()):
        if not name.endswith(".parquet"):
            continue
        run_id = name.removesuffix(".parquet")
        rows = store.read_table(*layout.metrics_table(run_id)).select(["model_version", "created"]).to_pylist()
        if rows and rows[0]["model_version"] == version and (rows[0]["created"], run_id) > best:
            best = (rows[0]["created"], run_id)
    return best[1] if best else None


def find_target(store: Store, name: str) -> ReportTarget:
    """RUN_ID or MODEL_VERSION -> the run to report on; ValueError saying what exists when neither matches."""
    safe_part(name)
    if store.exists(*layout.metrics_table(name)):
        rows = store.read_table(*layout.metrics_table(name)).select(["model_version"]).to_pylist()
        return ReportTarget("evaluation", name, rows[0]["model_version"] if rows else "")
    if store.exists(*layout.report(name, batch.RUN_FILE)):
        return ReportTarget("batch", name, json.loads(store.read_bytes(*layout.report(name, batch.RUN_FILE)))
                            ["model_version"])
    for version in store.listdir(*layout.scores_root()):
        if store.exists(*layout.scores(version, f"{name}.parquet")):
            return ReportTarget("batch", name, version)
    if store.exists(*layout.model_file(name, layout.MANIFEST)):
        run_id = latest_evaluation(store, name)
        if run_id is None:
            raise ValueError(f"model version {name} has no evaluation run in {store.root_url}; evaluate it with "
                             f"`lafite evaluate --model-version {name} --data-root ... --store {store.root_url}`")
        return ReportTarget("evaluation", run_id, name)
    raise ValueError(f"{name!r} is neither a run (evaluation or batch scoring) nor a model version in "
                     f"{store.root_url}; `lafite versions` lists the versions, tables/metrics/ the evaluation runs")


def write_report(store: Store, name: str) -> tuple[ReportTarget, str]:
    """Build and write the report of the run ``name`` means; (target, URL of its index.html)."""
    target = find_target(store, name)
    if target.kind == "evaluation":
        return target, evaluation.write(store, target.run_id)
    return target, batch.write(store, target.model_version, target.run_id)
