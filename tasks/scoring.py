"""Batch scoring of an image dump in Ray-parallel shards, one Parquet part per shard.

The bookkeeping (parts, heartbeats, the merge lock, de-duplication, adoption of crashed runs) is
``lafite_core.store.ledger.ScoreLedger``; these tasks only run it on Prefect and Ray.
"""

from __future__ import annotations

import functools
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

import tasks.runtime as runtime
from lafite_core.store import layout
from lafite_core.method.backbone import FeatureExtractor
from lafite_core.datapath.data import outside_root, read_bytes
from lafite_core.datapath.images import decode_image
from lafite_core.store.ledger import ScoreLedger
from lafite_core.method.model import Scorer
from lafite_core.report.counts import CategoryCounts, count_by_category
from lafite_core.stages import judge_images, load_published
from lafite_core.store.storage import Store, content_hash, safe_part, storage_options_from_env
from tasks.progress import LogProgress, run_logger


@dataclass(frozen=True)
class ShardReport:
    shard: int
    scored: int
    skipped: int
    errors: int
    part: str | None
    categories: tuple[CategoryCounts, ...]  # the same counts per category, for the run's artifacts


def relative_parts(url: str, source_root: str) -> list[str]:
    """Path components of ``url`` below ``source_root``; ValueError for a name that could escape."""
    root = source_root.rstrip("/") + "/"
    rel = url[len(root):] if url.startswith(root) else posixpath.basename(url)
    return [safe_part(p) for p in rel.split("/") if p]


def infer_category(parts: list[str], categories: tuple[str, ...]) -> str | None:
    """The model category ("dataset/category") named by a folder on the image's path, if any."""
    names = {c.split("/", 1)[1]: c for c in categories}
    folders = parts[:-1]
    for a, b in zip(folders, folders[1:]):
        if f"{a}/{b}" in categories:
            return f"{a}/{b}"
    for p in folders:
        if p in names:
            return names[p]
    return None


@functools.lru_cache(maxsize=2)
def _scoring_setup(store_url: str, version: str):
    """Model, calibration, extractor and scorer, loaded once per worker process and version."""
    model, calibration, _ = load_published(Store(store_url), version)
    return model, calibration, FeatureExtractor(model.config.backbone), Scorer(model)


def score_shard_body(store_url: str, version: str, run_id: str, shard: int, urls: list[str], done, source_root: str,
                     method: str, heatmaps: bool) -> ShardReport:
    """On a Ray worker: score ``urls`` not in ``done`` (a set of (url, content hash)); write a part file."""
    runtime.use_assigned_cpus()
    store = Store(store_url)
    model, calibration, extractor, scorer = _scoring_setup(store_url, version)
    cfg = model.config
    opts = storage_options_from_env(source_root)
    now = datetime.now(timezone.utc)
    rows: list[dict] = []
    skipped: list[str | None] = []  # the category of each image skipped as already scored
    batch: list[tuple[str, str, np.ndarray, list[str]]] = []

    def base(url: str, digest: str | None, parts: list[str] | None) -> dict:
        return {"image_url": url, "content_hash": digest,
                "category": infer_category(parts, model.categories) if parts else None,
                "model_version": version, "method": method, "run_id": run_id, "scored_at": now,
                "raw_score": None, "normalized_score": None, "decision": None, "heatmap_url": None, "error": None}

    def flush() -> None:
        if not batch:
            return
        new = [base(url, digest, parts) for url, digest, _, parts in batch]
        judged = judge_images(scorer, extractor, calibration, method, [b[2] for b in batch], [b[1] for b in batch],
                              [r["category"] for r in new], heatmaps)
        for row, (_, _, _, parts), j in zip(new, batch, judged):
            row.update(raw_score=j.raw_score, normalized_score=j.normalized_score, decision=j.decision)
            if j.heatmap_png is not None:
                store.write_bytes(layout.heatmap(version, run_id, parts), j.heatmap_png)
                row["heatmap_url"] = store.url(*layout.heatmap(version, run_id, parts))
            rows.append(row)
        batch.clear()

    for url in urls:
        parts: list[str] | None = None
        digest: str | None = None
        try:
            parts = relative_parts(url, source_root)
            if outside_root(url, source_root):
                raise ValueError(f"{url}: refused, the link points outside the source folder {source_root}")
            data = read_bytes(url, opts)
            digest = content_hash(data)
            if (url, digest) in done:
                skipped.append(infer_category(parts, model.categories))
                continue
            image, _ = decode_image(data, cfg.data.image_size, url, cfg.data.max_image_pixels)
        except (OSError, ValueError) as exc:
            row = base(url, digest, None)
            row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            continue
        batch.append((url, digest, image, parts))
        if len(batch) >= cfg.scoring.batch_size:
            flush()
    flush()
    part = ScoreLedger(store, version).write_part(run_id, shard, rows)
    return ShardReport(shard, sum(r["error"] is None for r in rows), len(skipped),
                       sum(r["error"] is not None for r in rows), part, tuple(count_by_category(rows, skipped)))


@task(name="score-shards", cache_policy=NONE, retries=1, retry_delay_seconds=10)
def score_shards_task(store_url: str, version: str, run_id: str, urls: list[str], source_root: str, method: str,
                      heatmaps: bool, shard_size: int, ray_address: str | None = None) -> list[ShardReport]:
    """Fan the dump out over Ray, ``shard_size`` images per task."""
    import ray

    log = run_logger()
    ledger = ScoreLedger(Store(store_url), version)
    ledger.heartbeat(run_id)
    done = ledger.scored_keys(method)
    log.info("%d images listed, %d (url, content) pairs already scored with %s (%s)", len(urls), len(done),
             version, method)
    runtime.ray_init(ray_address)
    done_ref = ray.put(done)
    remote = ray.remote(num_cpus=1)(score_shard_body)
    shards = [urls[i : i + shard_size] for i in range(0, len(urls), shard_size)]
    # at most two tasks in flight per CPU keeps memory flat however large the dump is
    window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending: dict = {}
    progress = LogProgress(log)
    reports: list[ShardReport] = []
    next_shard = 0
    while next_shard < len(shards) or pending:
        while next_shard < len(shards) and len(pending) < window:
            ref = remote.remote(store_url, version, run_id, next_shard, shards[next_shard], done_ref, source_root,
                                method, heatmaps)
            pending[ref] = next_shard
            next_shard += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        reports.append(ray.get(ready[0]))
        del pending[ready[0]]
        ledger.heartbeat(run_id)
        progress("score shards", len(reports), len(shards))
    return sorted(reports, key=lambda r: r.shard)


@task(name="merge-scores", cache_policy=NONE, retries=3, retry_delay_seconds=5)
def merge_scores_task(store_url: str, version: str, run_id: str, stale_after_s: float = 900.0) -> str | None:
    """Merge this run's parts (and those of crashed runs) into one table without duplicate rows."""
    return ScoreLedger(Store(store_url), version).merge(run_id, stale_after_s, run_logger()).table
