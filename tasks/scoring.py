"""Batch scoring of an image dump in Ray-parallel shards, one Parquet part per shard.

Each shard writes ``tables/scores/<version>/parts/<run_id>/shard-NNNNN.parquet`` when it finishes;
the flow then merges the run's parts into ``tables/scores/<version>/<run_id>.parquet``. An image is
skipped when a row for the same URL and content hash, without error, already exists for the version;
an unreadable file becomes a row with its error.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NONE

import tasks.runtime as runtime
from lafite_core.backbone import FeatureExtractor
from lafite_core.data import content_hash, read_bytes
from lafite_core.features import extract
from lafite_core.heatmap import overlay_png
from lafite_core.images import decode_image
from lafite_core.model import Scorer
from lafite_core.pipeline import image_seed
from lafite_core.storage import Store, safe_part, storage_options_from_env
from lafite_core.tables import SCORES_SCHEMA, scores_table
from tasks.model import load_published
from tasks.progress import LogProgress, run_logger


@dataclass(frozen=True)
class ShardReport:
    shard: int
    scored: int
    skipped: int
    errors: int
    part: str | None


def relative_parts(url: str, source_root: str) -> list[str]:
    """Path components of ``url`` below ``source_root`` (each checked to be a safe name)."""
    root = source_root.rstrip("/") + "/"
    rel = url[len(root):] if url.startswith(root) else posixpath.basename(url)
    return [safe_part(p) for p in rel.split("/") if p]


def infer_category(parts: list[str], categories: tuple[str, ...]) -> str | None:
    """The model category ("dataset/category") named by a folder on the image's path, if any."""
    names = {c.split("/", 1)[1]: c for c in categories}
    for i, p in enumerate(parts[:-1]):
        if i + 1 < len(parts) - 1 and f"{p}/{parts[i + 1]}" in categories:
            return f"{p}/{parts[i + 1]}"
    for p in parts[:-1]:
        if p in names:
            return names[p]
    return None


def score_shard_body(store_url: str, version: str, run_id: str, shard: int, urls: list[str], done, source_root: str,
                     method: str, heatmaps: bool) -> ShardReport:
    """On a Ray worker: score ``urls`` not in ``done`` (a set of (url, content hash)); write a part file."""
    logging.basicConfig(level=logging.INFO)
    store = Store(store_url)
    model, calibration, _ = load_published(store, version)
    cfg = model.config
    opts = storage_options_from_env(source_root)
    extractor = FeatureExtractor(cfg.backbone)
    scorer = Scorer(model)
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
            if method == calibration.method:
                cut = calibration.cut_for(row["category"])
                row["normalized_score"] = cut.normalize(float(raw))
                row["decision"] = "anomalous" if raw >= cut.threshold else "normal"
            if heatmaps:
                cut = calibration.cut_for(row["category"])
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
            data = read_bytes(url, opts)
            digest = content_hash(data)
            if (url, digest) in done:
                skipped += 1
                continue
            image, _ = decode_image(data, cfg.data.image_size, url, cfg.data.max_image_pixels)
        except (OSError, ValueError) as exc:
            row = base(url, digest, parts)
            row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            continue
        batch.append((url, digest, image, parts))
        if len(batch) >= cfg.scoring.batch_size:
            flush()
    flush()
    part = None
    if rows:
        table = scores_table(rows)
        path = ["tables", "scores", version, "parts", run_id, f"shard-{shard:05d}.parquet"]
        store.write_table(path, table)
        part = store.url(*path)
    return ShardReport(shard, sum(r["error"] is None for r in rows), skipped, sum(r["error"] is not None for r in rows),
                       part)


def read_score_tables(store: Store, version: str) -> pa.Table:
    """Every score row recorded for ``version``: merged run tables and parts of unmerged runs."""
    tables = []
    merged = {n for n in store.listdir("tables", "scores", version) if n.endswith(".parquet")}
    for name in sorted(merged):
        tables.append(store.read_table("tables", "scores", version, name))
    for run in store.listdir("tables", "scores", version, "parts"):
        if f"{run}.parquet" in merged:  # merged already; its parts are left from an interrupted cleanup
            continue
        for name in store.listdir("tables", "scores", version, "parts", run):
            if name.endswith(".parquet"):
                tables.append(store.read_table("tables", "scores", version, "parts", run, name))
    if not tables:
        return SCORES_SCHEMA.empty_table()
    return pa.concat_tables([t.cast(SCORES_SCHEMA) for t in tables])


def already_scored(store: Store, version: str) -> set[tuple[str, str]]:
    t = read_score_tables(store, version)
    ok = [(u, h) for u, h, e in zip(t["image_url"].to_pylist(), t["content_hash"].to_pylist(), t["error"].to_pylist())
          if e is None]
    return set(ok)


@task(name="score-shards", cache_policy=NONE, retries=1, retry_delay_seconds=10)
def score_shards_task(store_url: str, version: str, run_id: str, urls: list[str], source_root: str, method: str,
                      heatmaps: bool, shard_size: int, ray_address: str | None = None) -> list[ShardReport]:
    """Fan the dump out over Ray, ``shard_size`` images per task."""
    import ray

    log = run_logger()
    store = Store(store_url)
    done = already_scored(store, version)
    log.info("%d images listed, %d (url, content) pairs already scored with %s", len(urls), len(done), version)
    runtime.ray_init(ray_address)
    done_ref = ray.put(done)
    remote = ray.remote(num_cpus=1)(score_shard_body)
    shards = [urls[i : i + shard_size] for i in range(0, len(urls), shard_size)]
    pending = {remote.remote(store_url, version, run_id, i, s, done_ref, source_root, method, heatmaps): i
               for i, s in enumerate(shards)}
    progress = LogProgress(log)
    reports: list[ShardReport] = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        reports.append(ray.get(ready[0]))
        del pending[ready[0]]
        progress("score shards", len(reports), len(shards))
    return sorted(reports, key=lambda r: r.shard)


@task(name="merge-scores", cache_policy=NONE, retries=3, retry_delay_seconds=5)
def merge_scores_task(store_url: str, version: str, run_id: str) -> str | None:
    """Merge the run's shard parts into one table, then remove the parts."""
    store = Store(store_url)
    names = [n for n in store.listdir("tables", "scores", version, "parts", run_id) if n.endswith(".parquet")]
    if not names:
        return None
    table = pa.concat_tables([store.read_table("tables", "scores", version, "parts", run_id, n) for n in names])
    table = table.sort_by([("image_url", "ascending")])
    store.write_table(["tables", "scores", version, f"{run_id}.parquet"], table)
    store.fs.rm(store.path("tables", "scores", version, "parts", run_id), recursive=True)
    return store.url("tables", "scores", version, f"{run_id}.parquet")

