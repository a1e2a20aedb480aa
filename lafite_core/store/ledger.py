"""The score ledger: which images a model version has scored, kept without duplicate rows.

While a batch-scoring run goes, each finished shard writes
``tables/scores/<version>/parts/<run_id>/shard-NNNNN.parquet`` and the run refreshes
``parts/<run_id>/_heartbeat``. At the end, under a lock (``tables/scores/<version>/merge.lock``, an
atomic create), the run merges its parts, plus the parts of runs whose heartbeat is stale (crashed
runs), into ``tables/scores/<version>/<run_id>.parquet``, dropping any (url, content hash) already in
another merged table: concurrent or resumed runs never leave duplicate rows. An image is skipped when
a row for the same URL and content, without error, already exists for the version; an unreadable or
refused file becomes a row with its error.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

import pyarrow as pa

from lafite_core.store import layout
from lafite_core.store.storage import Store, safe_part
from lafite_core.store.lookup import ScoredLookup
from lafite_core.store.tables import SCORES_ROW_GROUP, SCORES_SCHEMA, conform_scores, scores_table

HEARTBEAT = "_heartbeat"
MANIFESTS = "manifests"  # parts/<run_id>/manifests/shard-NNNNN.json: what each shard of the run is to read
LOCK = "merge.lock"

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LockTiming:
    """Merge-lock timing: a lock older than ``stale_s`` is taken over; waiting gives up after ``wait_s``."""

    stale_s: float = 300.0
    wait_s: float = 600.0
    poll_s: float = 0.5


@dataclass(frozen=True)
class MergeResult:
    """What a merge did: the table it wrote (None when nothing new), runs it adopted, rows it dropped."""

    table: str | None
    adopted: tuple[str, ...]
    duplicates: int


@dataclass(frozen=True)
class _Holder:
    run_id: str
    time: float  # wall clock (time.time()) when the holder took the lock


def _parse_holder(raw: bytes) -> _Holder | None:
    try:
        obj = json.loads(raw)
        return _Holder(str(obj["run_id"]), float(obj["time"]))
    except (ValueError, TypeError, KeyError):
        return None


class MergeLock:
    """Exclusive lock file (atomic create), polled until ``timing.wait_s`` passes.

    A lock older than ``timing.stale_s`` is taken over, and so is one whose file stays unreadable
    (garbage, or gone between the create and the read) for longer than that. Every retry sleeps
    ``timing.poll_s``. On exit the file is removed only if it is still the one this lock wrote.
    """

    def __init__(self, store: Store, parts: Sequence[str], owner: str, timing: LockTiming = LockTiming()) -> None:
        if timing.poll_s <= 0 or timing.wait_s < 0 or timing.stale_s < 0:
            raise ValueError(f"lock timing must have poll_s > 0 and wait_s, stale_s >= 0; got {timing}")
        self.store, self.parts, self.owner, self.timing = store, list(parts), owner, timing
        self.url = store.url(*self.parts)
        self._mine: bytes | None = None

    def __enter__(self) -> "MergeLock":
        deadline = time.monotonic() + self.timing.wait_s
        unreadable_since: float | None = None
        while True:
            mine = json.dumps({"run_id": self.owner, "time": time.time(), "pid": os.getpid(),
                               "token": uuid.uuid4().hex}).encode()
            try:
                self.store.write_bytes(self.parts, mine, exclusive=True)
                self._mine = mine
                return self
            except FileExistsError:
                pass
            raw = self._read()
            holder = _parse_holder(raw) if raw is not None else None
            now = time.monotonic()
            if holder is None:
                unreadable_since = now if unreadable_since is None else unreadable_since
                stale = now - unreadable_since > self.timing.stale_s
            else:
                unreadable_since = None
                stale = time.time() - holder.time > self.timing.stale_s
            if stale:
                _log.warning("taking over merge lock %s (%s)", self.url, self._describe(holder))
                if self._read() == raw:  # not replaced by a waiter that took it over first
                    self.store.delete(*self.parts)
                unreadable_since = None
            elif now >= deadline:
                raise TimeoutError(
                    f"merge lock {self.url} is held by {self._describe(holder)} and was not released within "
                    f"{self.timing.wait_s:g} s; if no run is merging scores now, delete {self.url} and run again")
            time.sleep(self.timing.poll_s)

    def __exit__(self, *exc: object) -> None:
        if self._mine is not None and self._read() == self._mine:
            self.store.delete(*self.parts)
        self._mine = None

    def _read(self) -> bytes | None:
        try:
            return self.store.read_bytes(*self.parts)
        except FileNotFoundError:
            return None

    def _describe(self, holder: _Holder | None) -> str:
        if holder is None:
            return "an unknown run (the lock file is unreadable)"
        since = datetime.fromtimestamp(holder.time, timezone.utc).isoformat(timespec="seconds")
        return f"run {holder.run_id} (since {since}, {time.time() - holder.time:.0f} s ago)"


def _row_key(url: str, digest: str | None, error: str | None, method: str | None) -> tuple:
    """A row is identified by (method, url, content hash) when scored, and by (method, url, hash, error)
    when not: the same image scored by LafitE and by the PatchCore baseline is two rows."""
    return (method, url, digest) if error is None else (method, url, digest, error)


class ScoreLedger:
    """The score rows of one model version in ``store``: parts per run and shard, merged run tables."""

    def __init__(self, store: Store, version: str, lock_timing: LockTiming = LockTiming()) -> None:
        self.store, self.version, self.lock_timing = store, safe_part(version), lock_timing

    def _path(self, *parts: str) -> list[str]:
        return layout.scores(self.version, *parts)

    def _merged_names(self) -> set[str]:
        return {n for n in self.store.listdir(*self._path()) if n.endswith(".parquet")}

    def _parts(self, run_id: str) -> list[pa.Table]:
        names = [n for n in self.store.listdir(*self._path("parts", run_id)) if n.endswith(".parquet")]
        return [conform_scores(self.store.read_table(*self._path("parts", run_id, n))) for n in names]

    def rows(self) -> pa.Table:
        """Every score row recorded for the version: merged run tables and parts of unmerged runs."""
        tables = []
        merged = self._merged_names()
        for name in sorted(merged):
            tables.append(conform_scores(self.store.read_table(*self._path(name))))
        for run in self.store.listdir(*self._path("parts")):
            if f"{run}.parquet" not in merged:  # else merged already, parts left by an interrupted cleanup
                tables += self._parts(run)
        if not tables:
            return SCORES_SCHEMA.empty_table()
        return pa.concat_tables(tables)

    def scored_keys(self, method: str = "lafite") -> set[tuple[str, str]]:
        """(url, content hash) of every image scored by ``method`` without error; rows with an error do
        not count."""
        t = self.rows()
        return {(u, h) for u, h, e, m in zip(t["image_url"].to_pylist(), t["content_hash"].to_pylist(),
                                             t["error"].to_pylist(), t["method"].to_pylist())
                if e is None and m == method}

    def lookup(self, method: str = "lafite") -> ScoredLookup:
        """The rows ``method`` scored without error, looked up page by page in URL order (a context
        manager): merged tables streamed, parts of unmerged runs read whole."""
        merged = sorted(self._merged_names())
        unmerged = []
        for run in self.store.listdir(*self._path("parts")):
            if f"{run}.parquet" not in merged:
                names = self.store.listdir(*self._path("parts", run))
                unmerged += [self._path("parts", run, n) for n in names if n.endswith(".parquet")]
        return ScoredLookup(self.store, [self._path(n) for n in merged], unmerged, method)

    def next_shard(self, run_id: str) -> int:
        """The first shard number ``run_id`` has not used (a retried run must not overwrite its parts)."""
        names = self.store.listdir(*self._path("parts", run_id))
        names += self.store.listdir(*self._path("parts", run_id, MANIFESTS))
        used = [int(n[6:11]) for n in names if n.startswith("shard-") and n[6:11].isdigit()]
        return max(used, default=-1) + 1

    def write_manifest(self, run_id: str, shard: int, manifest: bytes) -> str:
        """Write a shard's manifest (what it is to read) beside the run's parts; removed by the merge."""
        path = self._path("parts", run_id, MANIFESTS, f"shard-{shard:05d}.json")
        self.store.write_bytes(path, manifest)
        return self.store.url(*path)

    def read_manifest(self, run_id: str, shard: int) -> bytes:
        return self.store.read_bytes(*self._path("parts", run_id, MANIFESTS, f"shard-{shard:05d}.json"))

    def write_part(self, run_id: str, shard: int, rows: Sequence[dict]) -> str | None:
        """Write a shard's rows (SCORES_SCHEMA columns) as one part of ``run_id``; its URL, None if no rows."""
        if not rows:
            return None
        path = self._path("parts", run_id, f"shard-{shard:05d}.parquet")
        self.store.write_table(path, scores_table(rows))
        return self.store.url(*path)

    def heartbeat(self, run_id: str) -> None:
        """Record that ``run_id`` is alive; a run whose heartbeat goes stale is adopted by the next merge."""
        self.store.write_json(self._path("parts", run_id, HEARTBEAT),
                              {"run_id": run_id, "time": time.time(), "pid": os.getpid()})

    def lock(self, run_id: str) -> MergeLock:
        """The version's merge lock, to be held by ``run_id``."""
        return MergeLock(self.store, self._path(LOCK), run_id, self.lock_timing)

    def _stale_runs(self, run_id: str, merged: set[str], stale_s: float) -> list[str]:
        out = []
        for run in self.store.listdir(*self._path("parts")):
            if run == run_id or f"{run}.parquet" in merged:
                continue
            try:
                beat = self.store.read_json(*self._path("parts", run, HEARTBEAT))["time"]
            except FileNotFoundError:
                beat = 0.0
            if time.time() - beat > stale_s:
                out.append(run)
        return out

    def merge(self, run_id: str, stale_after_s: float,
              log: logging.Logger | logging.LoggerAdapter | None = None) -> MergeResult:
        """Merge the parts of ``run_id``, and of runs silent for ``stale_after_s``, into ``<run_id>.parquet``.

        Under the merge lock: rows already in another merged table are dropped, then the merged parts are
        deleted.
        """
        log = log or _log
        with self.lock(run_id):
            merged = self._merged_names()
            adopted = self._stale_runs(run_id, merged, stale_after_s)
            tables = self._parts(run_id)
            for run in adopted:
                log.info("adopting the rows of interrupted run %s", run)
                tables += self._parts(run)
            table, dropped = None, 0
            if tables:
                seen: set[tuple] = set()
                for name in sorted(merged):
                    t = self.store.read_table(*self._path(name))
                    cols = (t["image_url"].to_pylist(), t["content_hash"].to_pylist(), t["error"].to_pylist(),
                            t["method"].to_pylist())
                    seen |= {_row_key(u, h, e, m) for u, h, e, m in zip(*cols)}
                rows, keep = pa.concat_tables(tables).sort_by([("image_url", "ascending")]).to_pylist(), []
                for r in rows:
                    key = _row_key(r["image_url"], r["content_hash"], r["error"], r["method"])
                    if key in seen:
                        continue  # recorded by a concurrent run that merged first
                    seen.add(key)
                    keep.append(r)
                if keep:
                    path = self._path(f"{run_id}.parquet")
                    self.store.write_table(path, scores_table(keep), row_group_size=SCORES_ROW_GROUP)
                    table = self.store.url(*path)
                dropped = len(rows) - len(keep)
                if dropped:
                    log.info("%d rows were already merged by another run and are not repeated", dropped)
            for run in [run_id, *adopted]:
                self.store.delete(*self._path("parts", run), recursive=True)
        return MergeResult(table, tuple(adopted), dropped)


def read_score_tables(store: Store, version: str) -> pa.Table:
    """Every score row recorded for ``version`` (see ``ScoreLedger.rows``)."""
    return ScoreLedger(store, version).rows()
