"""Batch scoring of an image dump in Ray-parallel shards, one Parquet part per shard.

The bookkeeping (parts, heartbeats, the merge lock, de-duplication, adoption of crashed runs) is
``lafite_core.store.ledger.ScoreLedger``; these tasks only run it on Prefect and Ray.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

import tasks.runtime as runtime
from lafite_core.store import layout
from lafite_core.method.backbone import FeatureExtractor
from lafite_core.datapath.data import outside_root, read_bytes
from lafite_core.datapath.images import decode_image
from lafite_core.datapath.listing import DEFAULT_PAGE_SIZE, category_of, infer_category, iter_listing, relative_parts
from lafite_core.store.ledger import ScoreLedger
from lafite_core.store.shards import ShardItem, ShardManifest, plan_shards
from lafite_core.method.model import Scorer
from lafite_core.report.counts import NO_CATEGORY, CategoryCounts, add_counts, count_by_category
from lafite_core.stages import judge_images, load_published, published_categories
from lafite_core.store.storage import Store, content_hash, storage_options_from_env
from tasks.progress import LogProgress, run_logger

HEARTBEAT_EVERY_S = 60.0  # while the listing goes on: a run silent for stale_after_s is taken for crashed


@dataclass(frozen=True)
class ShardReport:
    shard: int
    scored: int
    skipped: int
    errors: int
    part: str | None
    categories: tuple[CategoryCounts, ...]  # the same counts per category, for the run's artifacts


@dataclass(frozen=True)
class DumpReport:
    """What scoring a dump did: images listed, shards run, and the counts over them and the images
    skipped unread (their listing signature matched a scored row)."""

    listed: int
    shards: int
    scored: int
    skipped: int
    errors: int
    skipped_unread: int
    categories: tuple[CategoryCounts, ...]
    first_shard_s: float | None  # seconds from the start of the listing to the first shard submitted


@functools.lru_cache(maxsize=2)
def _scoring_setup(store_url: str, version: str):
    """Model, calibration, extractor and scorer, loaded once per worker process and version."""
    model, calibration, _ = load_published(Store(store_url), version)
    return model, calibration, FeatureExtractor(model.config.backbone), Scorer(model)


def score_shard_body(store_url: str, version: str, run_id: str, shard: int, urls: list[str], done, source_root: str,
                     method: str, heatmaps: bool) -> ShardReport:
    """On a Ray worker: score ``urls`` not in ``done`` (a set of (url, content hash)); write a part file."""
    by_url: dict[str, set[str]] = {}
    for url, digest in done:
        by_url.setdefault(url, set()).add(digest)
    items = [ShardItem(u, None, tuple(sorted(by_url.get(u, ())))) for u in urls]
    return score_items(store_url, version, run_id, shard, items, source_root, method, heatmaps)


def score_manifest_body(store_url: str, version: str, run_id: str, shard: int, method: str,
                        heatmaps: bool) -> ShardReport:
    """On a Ray worker: score the images of shard ``shard``'s manifest; write a part file."""
    ledger = ScoreLedger(Store(store_url), version)
    manifest = ShardManifest.from_bytes(ledger.read_manifest(run_id, shard))
    return score_items(store_url, version, run_id, shard, manifest.items, manifest.source_root, method, heatmaps)


def score_items(store_url: str, version: str, run_id: str, shard: int, items: Iterable[ShardItem], source_root: str,
                method: str, heatmaps: bool) -> ShardReport:
    """Read each item, skip it when its content hash is already scored, else score it; write a part file."""
    runtime.use_assigned_cpus()
    store = Store(store_url)
    model, calibration, extractor, scorer = _scoring_setup(store_url, version)
    cfg = model.config
    opts = storage_options_from_env(source_root)
    now = datetime.now(timezone.utc)
    rows: list[dict] = []
    skipped: list[str | None] = []  # the category of each image skipped as already scored
    resigned: list[dict] = []  # read again, unchanged, under a new listing signature: recorded for the next run
    batch: list[tuple[ShardItem, str, np.ndarray, list[str]]] = []

    def base(url: str, digest: str | None, parts: list[str] | None, signature: str | None) -> dict:
        return {"image_url": url, "content_hash": digest, "listing_signature": signature,
                "category": infer_category(parts, model.categories) if parts else None,
                "model_version": version, "method": method, "run_id": run_id, "scored_at": now,
                "raw_score": None, "normalized_score": None, "decision": None, "heatmap_url": None, "error": None}

    def flush() -> None:
        if not batch:
            return
        new = [base(item.url, digest, parts, item.signature) for item, digest, _, parts in batch]
        judged = judge_images(scorer, extractor, calibration, method, [b[2] for b in batch], [b[1] for b in batch],
                              [r["category"] for r in new], heatmaps)
        for row, (_, _, _, parts), j in zip(new, batch, judged):
            row.update(raw_score=j.raw_score, normalized_score=j.normalized_score, decision=j.decision)
            if j.heatmap_png is not None:
                store.write_bytes(layout.heatmap(version, run_id, parts), j.heatmap_png)
                row["heatmap_url"] = store.url(*layout.heatmap(version, run_id, parts))
            rows.append(row)
        batch.clear()

    for item in items:
        url = item.url
        parts: list[str] | None = None
        digest: str | None = None
        try:
            parts = relative_parts(url, source_root)
            if outside_root(url, source_root):
                raise ValueError(f"{url}: refused, the link points outside the source folder {source_root}")
            data = read_bytes(url, opts)
            digest = content_hash(data)
            if digest in item.known:
                skipped.append(infer_category(parts, model.categories))
                if item.signature is not None:
                    resigned.append({"image_url": url, "content_hash": digest, "listing_signature": item.signature,
                                     "method": method})
                continue
            image, _ = decode_image(data, cfg.data.image_size, url, cfg.data.max_image_pixels,
                                    crop=cfg.data.center_crop)
        except (OSError, ValueError) as exc:
            row = base(url, digest, None, item.signature)
            row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            continue
        batch.append((item, digest, image, parts))
        if len(batch) >= cfg.scoring.batch_size:
            flush()
    flush()
    ledger = ScoreLedger(store, version)
    ledger.write_signatures(run_id, shard, resigned)
    part = ledger.write_part(run_id, shard, rows)
    return ShardReport(shard, sum(r["error"] is None for r in rows), len(skipped),
                       sum(r["error"] is not None for r in rows), part, tuple(count_by_category(rows, skipped)))


@task(name="score-shards", cache_policy=NONE, retries=1, retry_delay_seconds=10)
def score_shards_task(store_url: str, version: str, run_id: str, source_root: str, method: str, heatmaps: bool,
                      shard_size: int, ray_address: str | None = None,
                      page_size: int = DEFAULT_PAGE_SIZE) -> DumpReport:
    """List ``source_root`` page by page and fan its shards out over Ray as they are cut.

    The listing is never held whole: each shard's images go into a manifest in the store and its Ray
    task gets only the shard's number; images whose listing signature matches a scored row are skipped
    here, unread, and Ray is started only when a first shard has something to read. At most two shards
    per CPU are in flight.
    """
    import ray

    log = run_logger()
    store = Store(store_url)
    ledger = ScoreLedger(store, version)
    ledger.heartbeat(run_id)
    beat = time.monotonic()
    categories = published_categories(store, version)
    pages = iter_listing(source_root, storage_options_from_env(source_root), page_size)
    progress = LogProgress(log)
    reports: list[ShardReport] = []
    pending: dict = {}
    window, remote, listed = 0, None, 0
    first_number = shard = ledger.next_shard(run_id)  # after those of an earlier try of this task
    unread: Counter = Counter()  # category -> images skipped unread
    t0, first_shard = time.monotonic(), None

    def collect() -> None:
        ready, _ = ray.wait(list(pending), num_returns=1)
        reports.append(ray.get(ready[0]))
        del pending[ready[0]]
        ledger.heartbeat(run_id)

    with ledger.lookup(method) as lookup:
        for step in plan_shards(pages, lookup, shard_size, source_root):
            listed += step.listed
            unread.update(category_of(u, source_root, categories) for u in step.skipped)
            if step.items:
                if remote is None:
                    runtime.ray_init(ray_address)
                    remote = ray.remote(num_cpus=1)(score_manifest_body)
                    window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
                while len(pending) >= window:
                    collect()
                    progress("score shards", len(reports), 0)
                ledger.write_manifest(run_id, shard, ShardManifest(run_id, shard, source_root, step.items).to_bytes())
                pending[remote.remote(store_url, version, run_id, shard, method, heatmaps)] = shard
                if first_shard is None:
                    first_shard = time.monotonic() - t0
                    log.info("first shard started %.1f s after the listing began", first_shard)
                shard += 1
            if time.monotonic() - beat > HEARTBEAT_EVERY_S:
                ledger.heartbeat(run_id)
                beat = time.monotonic()
    shards = shard - first_number
    log.info("%d images listed under %s: %d skipped unread (listing unchanged since scored with %s, %s), "
             "%d to read in %d shards", listed, source_root, sum(unread.values()), version, method,
             listed - sum(unread.values()), shards)
    while pending:
        collect()
        progress("score shards", len(reports), shards)
    skipped_unread = [CategoryCounts(c or NO_CATEGORY, skipped=n) for c, n in unread.items()]
    cats = add_counts([*(r.categories for r in reports), skipped_unread])
    n_unread = sum(unread.values())
    return DumpReport(listed, shards, sum(r.scored for r in reports), n_unread + sum(r.skipped for r in reports),
                      sum(r.errors for r in reports), n_unread, tuple(cats), first_shard)


@task(name="merge-scores", cache_policy=NONE, retries=3, retry_delay_seconds=5)
def merge_scores_task(store_url: str, version: str, run_id: str, stale_after_s: float = 900.0) -> str | None:
    """Merge this run's parts (and those of crashed runs) into one table without duplicate rows."""
    return ScoreLedger(Store(store_url), version).merge(run_id, stale_after_s, run_logger()).table
