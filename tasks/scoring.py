"""Batch scoring of an image dump in Ray-parallel shards, one Parquet part per shard.

While a run goes, each finished shard writes ``tables/scores/<version>/parts/<run_id>/shard-NNNNN.parquet``
and the run refreshes ``parts/<run_id>/_heartbeat``. At the end, under a lock
(``tables/scores/<version>/merge.lock``, an atomic create), the run merges its parts, plus the parts of
runs whose heartbeat is stale (crashed runs), into ``tables/scores/<version>/<run_id>.parquet``,
dropping any (url, content hash) already in another merged table: concurrent or resumed runs never
leave duplicate rows. An image is skipped when a row for the same URL and content, without error,
already exists for the version; an unreadable or refused file becomes a row with its error.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NONE

import tasks.runtime as runtime
from lafite_core.backbone import FeatureExtractor
from lafite_core.data import content_hash, outside_root, read_bytes
from lafite_core.features import extract
from lafite_core.heatmap import overlay_png
from lafite_core.images import decode_image
from lafite_core.model import Scorer
from lafite_core.pipeline import image_seed
from lafite_core.storage import Store, safe_part, storage_options_from_env
from lafite_core.tables import SCORES_SCHEMA, scores_table
from tasks.model import load_published
from tasks.progress import LogProgress, run_logger

HEARTBEAT = "_heartbeat"


@dataclass(frozen=True)
class ShardReport:
    shard: int
    scored: int
    skipped: int
    errors: int
    part: str | None


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
    skipped = 0
    batch: list[tuple[str, str, np.ndarray, list[str]]] = []

    def base(url: str, digest: str | None, parts: list[str] | None) -> dict:
        return {"image_url": url, "content_hash": digest,
                "category": infer_category(parts, model.categories) if parts else None,
                "model_version": version, "method": method, "run_id": run_id, "scored_at": now,
                "raw_score": None, "normalized_score": None, "decision": None, "heatmap_url": None, "error": None}

    def flush() -> None:
        if not batch:
            return
        feats = torch.from_numpy(extract(extractor, [b[2] for b in batch]))
        out = scorer.score(feats, method, [image_seed(cfg.seed, b[1]) for b in batch])
        for (url, digest, image, parts), raw, amap in zip(batch, out.scores.numpy(), out.maps.numpy()):
            row = base(url, digest, parts)
            row["raw_score"] = float(raw)
            cut = calibration.cut_for(row["category"])
            if method == calibration.method:
                row["normalized_score"] = cut.normalize(float(raw))
                row["decision"] = "anomalous" if raw >= cut.threshold else "normal"
            if heatmaps:
                png = overlay_png(image, amap, cut.normal_median, 2 * cut.threshold - cut.normal_median)
                hp = ["heatmaps", version, run_id, *parts[:-1], posixpath.splitext(parts[-1])[0] + ".png"]
                store.write_bytes(hp, png)
                row["heatmap_url"] = store.url(*hp)
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
                skipped += 1
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
    part = None
    if rows:
        path = ["tables", "scores", version, "parts", run_id, f"shard-{shard:05d}.parquet"]
        store.write_table(path, scores_table(rows))
        part = store.url(*path)
    return ShardReport(shard, sum(r["error"] is None for r in rows), skipped, sum(r["error"] is not None for r in rows),
                       part)


def _parts(store: Store, version: str, run: str) -> list[pa.Table]:
    names = [n for n in store.listdir("tables", "scores", version, "parts", run) if n.endswith(".parquet")]
    return [store.read_table("tables", "scores", version, "parts", run, n).cast(SCORES_SCHEMA) for n in names]


def read_score_tables(store: Store, version: str) -> pa.Table:
    """Every score row recorded for ``version``: merged run tables and parts of unmerged runs."""
    tables = []
    merged = {n for n in store.listdir("tables", "scores", version) if n.endswith(".parquet")}
    for name in sorted(merged):
        tables.append(store.read_table("tables", "scores", version, name).cast(SCORES_SCHEMA))
    for run in store.listdir("tables", "scores", version, "parts"):
        if f"{run}.parquet" not in merged:  # else merged already, parts left by an interrupted cleanup
            tables += _parts(store, version, run)
    if not tables:
        return SCORES_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def already_scored(store: Store, version: str) -> set[tuple[str, str]]:
    t = read_score_tables(store, version)
    return {(u, h) for u, h, e in zip(t["image_url"].to_pylist(), t["content_hash"].to_pylist(),
                                      t["error"].to_pylist()) if e is None}


def heartbeat(store: Store, version: str, run_id: str) -> None:
    store.write_json(["tables", "scores", version, "parts", run_id, HEARTBEAT],
                     {"run_id": run_id, "time": time.time(), "pid": os.getpid()})


@task(name="score-shards", cache_policy=NONE, retries=1, retry_delay_seconds=10)
def score_shards_task(store_url: str, version: str, run_id: str, urls: list[str], source_root: str, method: str,
                      heatmaps: bool, shard_size: int, ray_address: str | None = None) -> list[ShardReport]:
    """Fan the dump out over Ray, ``shard_size`` images per task."""
    import ray

    log = run_logger()
    store = Store(store_url)
    heartbeat(store, version, run_id)
    done = already_scored(store, version)
    log.info("%d images listed, %d (url, content) pairs already scored with %s", len(urls), len(done), version)
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
        heartbeat(store, version, run_id)
        progress("score shards", len(reports), len(shards))
    return sorted(reports, key=lambda r: r.shard)


class MergeLock:
    """Exclusive lock file (atomic create); a lock older than ``stale_s`` is taken over."""

    def __init__(self, store: Store, version: str, run_id: str, stale_s: float = 300.0, wait_s: float = 600.0):
        self.store, self.parts = store, ["tables", "scores", version, "merge.lock"]
        self.run_id, self.stale_s, self.wait_s = run_id, stale_s, wait_s

    def __enter__(self) -> "MergeLock":
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                self.store.write_bytes(self.parts, json.dumps({"run_id": self.run_id, "time": time.time()}).encode(),
                                       exclusive=True)
                return self
            except FileExistsError:
                try:
                    holder = json.loads(self.store.read_bytes(*self.parts))
                except (FileNotFoundError, ValueError):
                    continue
                if time.time() - holder["time"] > self.stale_s:
                    self.store.delete(*self.parts)
                    continue
                if time.monotonic() > deadline:
                    raise TimeoutError(f"merge lock held by run {holder['run_id']} for too long")
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.store.delete(*self.parts)


def _stale_runs(store: Store, version: str, run_id: str, merged: set[str], stale_s: float) -> list[str]:
    out = []
    for run in store.listdir("tables", "scores", version, "parts"):
        if run == run_id or f"{run}.parquet" in merged:
            continue
        try:
            beat = store.read_json("tables", "scores", version, "parts", run, HEARTBEAT)["time"]
        except FileNotFoundError:
            beat = 0.0
        if time.time() - beat > stale_s:
            out.append(run)
    return out


def _row_key(url: str, digest: str | None, error: str | None) -> tuple:
    return (url, digest) if error is None else (url, digest, error)


@task(name="merge-scores", cache_policy=NONE, retries=3, retry_delay_seconds=5)
def merge_scores_task(store_url: str, version: str, run_id: str, stale_after_s: float = 900.0) -> str | None:
    """Merge this run's parts (and those of crashed runs) into one table without duplicate rows."""
    log = run_logger()
    store = Store(store_url)
    with MergeLock(store, version, run_id):
        merged = {n for n in store.listdir("tables", "scores", version) if n.endswith(".parquet")}
        adopted = _stale_runs(store, version, run_id, merged, stale_after_s)
        tables = _parts(store, version, run_id)
        for run in adopted:
            log.info("adopting the rows of interrupted run %s", run)
            tables += _parts(store, version, run)
        table = None
        if tables:
            # a row is identified by (url, content hash) when scored, and by (url, hash, error) when not
            seen: set[tuple] = set()
            for name in sorted(merged):
                t = store.read_table("tables", "scores", version, name)
                seen |= {_row_key(u, h, e) for u, h, e in zip(t["image_url"].to_pylist(), t["content_hash"].to_pylist(),
                                                              t["error"].to_pylist())}
            rows, keep = pa.concat_tables(tables).sort_by([("image_url", "ascending")]).to_pylist(), []
            for r in rows:
                key = _row_key(r["image_url"], r["content_hash"], r["error"])
                if key in seen:
                    continue  # recorded by a concurrent run that merged first
                seen.add(key)
                keep.append(r)
            if keep:
                store.write_table(["tables", "scores", version, f"{run_id}.parquet"], scores_table(keep))
                table = store.url("tables", "scores", version, f"{run_id}.parquet")
            if len(keep) < len(rows):
                log.info("%d rows were already merged by another run and are not repeated", len(rows) - len(keep))
        for run in [run_id, *adopted]:
            store.delete("tables", "scores", version, "parts", run, recursive=True)
    return table
