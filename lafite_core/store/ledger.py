"""The score ledger: which images a model version has scored, kept without duplicate rows.

While a batch-scoring run goes, each finished shard writes
``tables/scores/<version>/parts/<run_id>/shard-NNNNN.parquet`` and the run refreshes
``parts/<run_id>/_heartbeat``. At the end, under a lock (``tables/scores/<version>/merge.lock``, an
atomic create), the run merges its parts, plus the parts of runs whose heartbeat is stale (crashed
runs), into ``tables/scores/<version>/<run_id>.parquet``, dropping any (url, content hash) already in
another merged table: concurrent or resumed runs never leave duplicate rows. An image is skipped when
a row for the same URL and content, without error, already exists for the version; an unreadable or
refused file becomes a row with its error.

An image read again and found unchanged (a file touched, an object copied onto itself) has a new
listing signature but no new score: its shard records (url, hash, new signature, method) in
``parts/<run_id>/signatures/shard-NNNNN.parquet``, merged with the run into
``tables/scores/<version>/signatures/<run_id>.parquet`` (sorted by URL, like the score tables). The
lookup reads those beside the score tables, so the next run skips that image unread; the score
tables themselves keep one row per image.

The merge streams: shards are cut from a listing in URL order, so a run's parts, each sorted, follow
one another in URL order. The merge reads the parts' URLs first (to learn which keys of the tables
merged before concern this run: those are read row group by row group and only they are kept), then
each part in turn, dropping rows already merged, and writes full row groups as it goes. Its memory
holds the run's URLs and those keys, not its rows, nor the version's history. Parts that overlap (a
retried task relisting the source, runs adopted together) are merged in memory instead, sorted as
Arrow arrays.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator, Sequence

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lafite_core.store import layout
from lafite_core.store.storage import Store, safe_part
from lafite_core.store.lookup import ScoredLookup
from lafite_core.store.tables import SCORES_ROW_GROUP, SCORES_SCHEMA, conform_scores, scores_table

HEARTBEAT = "_heartbeat"
MANIFESTS = "manifests"  # parts/<run_id>/manifests/shard-NNNNN.json: what each shard of the run is to read
SIGNATURES = "signatures"  # new listing signatures of images read again and found unchanged (module docstring)
SIGNATURES_SCHEMA = pa.schema([("image_url", pa.string()), ("content_hash", pa.string()),
                               ("listing_signature", pa.string()), ("method", pa.string()), ("error", pa.string())])
_KEY_COLUMNS = ("image_url", "content_hash", "error", "method")
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


def _tagged(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Strings prefixed with "=", null as "-": one key part that tells a null from any string."""
    return pc.fill_null(pc.binary_join_element_wise("=", column, ""), "-")


def _row_keys(table: pa.Table, columns: Sequence[str] = _KEY_COLUMNS) -> pa.Array:
    """One string per row identifying it: (method, url, content hash) when scored, (method, url, hash,
    error) when not (the error column takes part, null when scored), so the same image scored by LafitE
    and by the PatchCore baseline is two rows."""
    parts = [_tagged(table[c]) if c in table.column_names else pa.array(["-"] * table.num_rows)
             for c in columns]
    key = pc.binary_join_element_wise(*parts, "\x1f")
    return key.combine_chunks() if isinstance(key, pa.ChunkedArray) else key


def _first_of_each(keys: pa.Array) -> pa.Array:
    """Boolean mask: True at the first row of each key."""
    if not len(keys):
        return pa.array([], pa.bool_())
    idx = pa.table({"k": keys, "i": pa.array(range(len(keys)), pa.int64())})
    firsts = idx.group_by("k", use_threads=False).aggregate([("i", "min")])["i_min"].combine_chunks()
    return pc.is_in(idx["i"], value_set=firsts).combine_chunks()


def _sorted_unique(tables: list[pa.Table], key_columns: Sequence[str]) -> pa.Table:
    """Tables concatenated, sorted by URL (stable) and reduced to the first row of each key."""
    table = pa.concat_tables(tables).sort_by([("image_url", "ascending")])
    return table.filter(_first_of_each(_row_keys(table, key_columns)))


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

    def _signature_parts(self, run_id: str) -> list[pa.Table]:
        names = [n for n in self.store.listdir(*self._path("parts", run_id, SIGNATURES)) if n.endswith(".parquet")]
        return [self.store.read_table(*self._path("parts", run_id, SIGNATURES, n)).cast(SIGNATURES_SCHEMA)
                for n in names]

    def write_signatures(self, run_id: str, shard: int, rows: Sequence[dict]) -> str | None:
        """Record the new listing signatures of images a shard read again and found unchanged (dicts with
        image_url, content_hash, listing_signature, method); merged with the run (module docstring)."""
        if not rows:
            return None
        path = self._path("parts", run_id, SIGNATURES, f"shard-{shard:05d}.parquet")
        self.store.write_table(path, pa.Table.from_pylist([{**r, "error": None} for r in rows],
                                                          schema=SIGNATURES_SCHEMA))
        return self.store.url(*path)

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
        tables = [self._path(n) for n in merged]
        tables += [self._path(SIGNATURES, n) for n in sorted(self.store.listdir(*self._path(SIGNATURES)))
                   if n.endswith(".parquet")]
        unmerged = []
        for run in self.store.listdir(*self._path("parts")):
            if f"{run}.parquet" not in merged:
                names = self.store.listdir(*self._path("parts", run))
                unmerged += [self._path("parts", run, n) for n in names if n.endswith(".parquet")]
                names = self.store.listdir(*self._path("parts", run, SIGNATURES))
                unmerged += [self._path("parts", run, SIGNATURES, n) for n in names if n.endswith(".parquet")]
        return ScoredLookup(self.store, tables, unmerged, method)

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

        Under the merge lock: rows already in another merged table are dropped, the runs' new listing
        signatures go into ``signatures/<run_id>.parquet``, then the merged parts are deleted.
        """
        log = log or _log
        with self.lock(run_id):
            merged = self._merged_names()
            adopted = self._stale_runs(run_id, merged, stale_after_s)
            paths = self._part_paths(run_id)
            signatures = self._signature_parts(run_id)
            for run in adopted:
                log.info("adopting the rows of interrupted run %s", run)
                paths += self._part_paths(run)
                signatures += self._signature_parts(run)
            table, dropped = None, 0
            if paths:
                data, rows_in, rows_out = self._merge_parts(paths, sorted(merged), log)
                if rows_out:
                    path = self._path(f"{run_id}.parquet")
                    self.store.write_bytes(path, data)
                    table = self.store.url(*path)
                dropped = rows_in - rows_out
                if dropped:
                    log.info("%d rows were already merged by another run and are not repeated", dropped)
            if signatures:
                sig = _sorted_unique(signatures, ("method", "image_url", "content_hash", "listing_signature"))
                self.store.write_table(self._path(SIGNATURES, f"{run_id}.parquet"), sig.cast(SIGNATURES_SCHEMA),
                                       row_group_size=SCORES_ROW_GROUP)
                log.info("%d images were read again and found unchanged: their new listing signatures are "
                         "recorded, so the next run skips them unread", sig.num_rows)
            for run in [run_id, *adopted]:
                self.store.delete(*self._path("parts", run), recursive=True)
        return MergeResult(table, tuple(adopted), dropped)

    def _part_paths(self, run_id: str) -> list[list[str]]:
        """The run's part files in shard order."""
        names = sorted(n for n in self.store.listdir(*self._path("parts", run_id)) if n.endswith(".parquet"))
        return [self._path("parts", run_id, n) for n in names]

    def _read_part(self, parts: Sequence[str]) -> pa.Table:
        return conform_scores(self.store.read_table(*parts)).sort_by([("image_url", "ascending")])

    def _merge_parts(self, paths: Sequence[Sequence[str]], merged: Sequence[str],
                     log: logging.Logger | logging.LoggerAdapter) -> tuple[bytes, int, int]:
        """Parts -> (Parquet bytes of the rows not merged before, sorted by URL in row groups of
        SCORES_ROW_GROUP; rows read; rows kept). Streams when the parts follow one another in URL order
        (module docstring)."""
        urls, ordered, last = [], True, None
        for parts in paths:
            with self.store.open_parquet(*parts) as pf:
                u = self.store.retry.call(pf.read, columns=["image_url"],
                                          what=f"reading {self.store.url(*parts)}")["image_url"]
            u = pc.unique(u.combine_chunks() if isinstance(u, pa.ChunkedArray) else u)
            if len(u):
                lo, hi = pc.min_max(u).values()
                if last is not None and lo.as_py() < last:
                    ordered = False
                last = hi.as_py() if last is None else max(last, hi.as_py())
            urls.append(u)
        run_urls = pc.unique(pa.concat_arrays(urls)) if urls else pa.array([], pa.string())
        history: dict[str, set[str]] = {}  # url -> keys merged before, for this run's URLs only
        for url, key in self._merged_keys(merged, run_urls):
            history.setdefault(url, set()).add(key)
        del urls, run_urls
        buf, writer, pending = io.BytesIO(), None, []
        rows_in = rows_out = 0
        current: tuple[str | None, set[str]] = (None, set())  # the URL being passed and its keys so far

        def emit(t: pa.Table, final: bool = False) -> None:
            """Buffer ``t``; write the full row groups buffered (all rows when ``final``)."""
            nonlocal writer
            pending.append(t)
            if sum(p.num_rows for p in pending) < SCORES_ROW_GROUP and not final:
                return
            whole = pa.concat_tables(pending).cast(SCORES_SCHEMA)
            full = whole.num_rows if final else (whole.num_rows // SCORES_ROW_GROUP) * SCORES_ROW_GROUP
            if full:
                writer = writer or pq.ParquetWriter(buf, SCORES_SCHEMA)
                writer.write_table(whole.slice(0, full), row_group_size=SCORES_ROW_GROUP)
            pending[:] = [whole.slice(full)] if full < whole.num_rows else []

        def fresh(t: pa.Table) -> pa.Table:
            """Rows of ``t`` (URL order, after every row given before) whose key is neither merged before
            nor met earlier in the run; a key can repeat only under one URL, so only the current URL's
            keys are held."""
            nonlocal current
            keep = []
            for url, key in zip(t["image_url"].to_pylist(), _row_keys(t).to_pylist()):
                if url != current[0]:
                    current = (url, history.pop(url, set()))
                keep.append(key not in current[1])
                current[1].add(key)
            return t.filter(pa.array(keep, pa.bool_()))

        if ordered:  # one part at a time
            for parts in paths:
                t = self._read_part(parts)
                kept = fresh(t)
                rows_in, rows_out = rows_in + t.num_rows, rows_out + kept.num_rows
                emit(kept)
        else:
            log.info("the parts overlap (a retried task or adopted runs): merging them in memory")
            t = pa.concat_tables([self._read_part(p) for p in paths]).sort_by([("image_url", "ascending")])
            kept = fresh(t)
            rows_in, rows_out = t.num_rows, kept.num_rows
            emit(kept)
        emit(SCORES_SCHEMA.empty_table(), final=True)
        if writer is None:
            return b"", rows_in, 0
        writer.close()
        return buf.getvalue(), rows_in, rows_out

    def _merged_keys(self, names: Sequence[str], urls: pa.Array) -> Iterator[tuple[str, str]]:
        """(url, row key) of the rows of the merged tables ``names`` whose URL is among ``urls``, read row
        group by row group."""
        for name in names:
            with self.store.open_parquet(*self._path(name)) as pf:
                cols = [c for c in _KEY_COLUMNS if c in pf.schema_arrow.names]
                for i in range(pf.metadata.num_row_groups):
                    group = self.store.retry.call(pf.read_row_group, i, columns=cols,
                                                  what=f"reading {self.store.url(*self._path(name))}")
                    group = group.filter(pc.is_in(group["image_url"], value_set=urls))
                    if group.num_rows:
                        yield from zip(group["image_url"].to_pylist(), _row_keys(group).to_pylist())


def read_score_tables(store: Store, version: str) -> pa.Table:
    """Every score row recorded for ``version`` (see ``ScoreLedger.rows``)."""
    return ScoreLedger(store, version).rows()
