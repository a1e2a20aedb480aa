"""The score ledger on a local store: parts, de-duplication, adoption of crashed runs, the merge lock."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone

import pytest

from lafite_core.store import ledger as ledger_mod
from lafite_core.store.ledger import HEARTBEAT, LOCK, LockTiming, MergeLock, ScoreLedger, read_score_tables
from lafite_core.store.storage import Store

V = "v1"
FAST = LockTiming(stale_s=60.0, wait_s=5.0, poll_s=0.01)


def row(url: str, digest: str | None = "h", run_id: str = "r", error: str | None = None,
        method: str = "lafite") -> dict:
    ok = error is None
    return {"image_url": url, "content_hash": digest, "category": None, "raw_score": 1.0 if ok else None,
            "normalized_score": None, "decision": "normal" if ok else None, "model_version": V, "method": method,
            "run_id": run_id, "heatmap_url": None, "error": error, "scored_at": datetime.now(timezone.utc)}


def keys(ledger: ScoreLedger) -> list[tuple]:
    t = ledger.rows()
    return list(zip(t["image_url"].to_pylist(), t["content_hash"].to_pylist(), t["error"].to_pylist()))


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "store"))


@pytest.fixture
def ledger(store) -> ScoreLedger:
    return ScoreLedger(store, V, FAST)


def test_parts_are_written_per_run_and_shard(ledger, store):
    assert ledger.write_part("r", 3, []) is None
    url = ledger.write_part("r", 3, [row("a")])
    assert url == store.url("tables", "scores", V, "parts", "r", "shard-00003.parquet")
    assert store.exists("tables", "scores", V, "parts", "r", "shard-00003.parquet")


def test_scored_keys_exclude_error_rows(ledger):
    ledger.write_part("r", 0, [row("a", "ha"), row("b", None, error="OSError: gone"), row("c", "hc", error="bad")])
    ledger.merge("r", stale_after_s=3600)
    ledger.write_part("s", 0, [row("d", "hd", "s")])  # an unmerged run counts too
    assert ledger.scored_keys() == {("a", "ha"), ("d", "hd")}
    assert len(read_score_tables(ledger.store, V)) == 4


def test_each_method_has_its_own_rows(ledger):
    """Scoring a dump with the PatchCore baseline after LafitE scores it again and keeps both rows."""
    ledger.write_part("a", 0, [row("x", "hx", "a"), row("y", "hy", "a")])
    ledger.merge("a", stale_after_s=3600)
    assert ledger.scored_keys("patchcore") == set()
    ledger.write_part("b", 0, [row("x", "hx", "b", method="patchcore"), row("x", "hx", "b")])
    assert ledger.merge("b", stale_after_s=3600).duplicates == 1  # only LafitE's repeat of x
    assert ledger.scored_keys("patchcore") == {("x", "hx")}
    assert ledger.scored_keys("lafite") == {("x", "hx"), ("y", "hy")}
    t = ledger.rows()
    assert sorted(zip(t["method"].to_pylist(), t["image_url"].to_pylist())) == [
        ("lafite", "x"), ("lafite", "y"), ("patchcore", "x")]


def test_merge_drops_rows_merged_by_another_run(ledger, store):
    ledger.write_part("a", 0, [row("x", run_id="a"), row("y", run_id="a"), row("e", None, "a", error="bad")])
    first = ledger.merge("a", stale_after_s=3600)
    assert first.table == store.url("tables", "scores", V, "a.parquet") and first.duplicates == 0
    # run b scored x and y again (same content), one new image, and the same error again
    ledger.write_part("b", 0, [row("x", run_id="b"), row("y", run_id="b"), row("z", run_id="b"),
                               row("e", None, "b", error="bad")])
    ledger.write_part("b", 1, [row("z", run_id="b")])  # two shards of one run may overlap too
    second = ledger.merge("b", stale_after_s=3600)
    assert second.duplicates == 4
    assert store.read_table("tables", "scores", V, "b.parquet")["image_url"].to_pylist() == ["z"]
    assert sorted(keys(ledger)) == [("e", None, "bad"), ("x", "h", None), ("y", "h", None), ("z", "h", None)]
    assert store.listdir("tables", "scores", V, "parts") == []


def test_a_changed_file_or_a_new_error_is_a_new_row(ledger):
    ledger.write_part("a", 0, [row("x", "h1", "a"), row("e", None, "a", error="OSError")])
    ledger.merge("a", stale_after_s=3600)
    ledger.write_part("b", 0, [row("x", "h2", "b"), row("e", None, "b", error="ValueError")])
    assert ledger.merge("b", stale_after_s=3600).duplicates == 0
    assert len(keys(ledger)) == 4


def test_concurrent_merges_leave_no_duplicate_rows(store):
    both = [row(f"img{i}", run_id="x") for i in range(20)]
    for run in ("a", "b"):
        ScoreLedger(store, V, FAST).write_part(run, 0, both + [row(f"only-{run}", run_id=run)])
    results: dict[str, object] = {}

    def merge(run: str) -> None:
        results[run] = ScoreLedger(store, V, FAST).merge(run, stale_after_s=3600)

    threads = [threading.Thread(target=merge, args=(run,)) for run in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r.duplicates for r in results.values()) == [0, 20]
    k = keys(ScoreLedger(store, V))
    assert len(k) == len(set(k)) == 22
    assert not store.exists("tables", "scores", V, LOCK)


def test_crashed_runs_are_adopted_and_live_runs_are_not(ledger, store):
    ledger.write_part("crashed", 0, [row("c", run_id="crashed")])
    ledger.write_part("live", 0, [row("l", run_id="live")])
    ledger.write_part("silent", 0, [row("s", run_id="silent")])  # died before its first heartbeat
    ledger.heartbeat("live")
    store.write_json(["tables", "scores", V, "parts", "crashed", HEARTBEAT],
                     {"run_id": "crashed", "time": time.time() - 1000})
    ledger.write_part("me", 0, [row("m", run_id="me")])
    ledger.heartbeat("me")
    result = ledger.merge("me", stale_after_s=600)
    assert result.adopted == ("crashed", "silent")
    merged = store.read_table("tables", "scores", V, "me.parquet")
    assert sorted(merged["image_url"].to_pylist()) == ["c", "m", "s"]
    assert store.listdir("tables", "scores", V, "parts") == ["live"]  # adopted parts are cleaned up
    assert sorted(u for u, _, _ in keys(ledger)) == ["c", "l", "m", "s"]


def test_a_merge_with_no_parts_writes_nothing(ledger, store):
    assert ledger.merge("r", stale_after_s=3600) == ledger_mod.MergeResult(None, (), 0)
    assert store.listdir("tables", "scores", V) == []


def _count_sleeps(monkeypatch) -> list[float]:
    sleeps: list[float] = []
    real = time.sleep

    def sleep(s: float) -> None:
        sleeps.append(s)
        real(s)

    monkeypatch.setattr(ledger_mod.time, "sleep", sleep)
    return sleeps


def test_the_lock_times_out_with_a_clear_error_while_a_live_run_holds_it(ledger, store, monkeypatch):
    waiter = ScoreLedger(store, V, LockTiming(stale_s=60.0, wait_s=0.1, poll_s=0.02))
    with ledger.lock("holder"):
        sleeps = _count_sleeps(monkeypatch)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as err:
            with waiter.lock("waiter"):
                pass
        assert time.monotonic() - t0 < 5
        assert 3 <= len(sleeps) <= 10 and set(sleeps) == {0.02}
    message = str(err.value)
    lock_url = store.url("tables", "scores", V, LOCK)
    assert lock_url in message and "run holder" in message and f"delete {lock_url}" in message
    assert not store.exists("tables", "scores", V, LOCK)  # the holder still released its lock


def test_an_old_lock_is_taken_over(ledger, store):
    old = {"run_id": "dead", "time": time.time() - 1000}
    store.write_bytes(["tables", "scores", V, LOCK], json.dumps(old).encode())
    with ScoreLedger(store, V, LockTiming(stale_s=60.0, wait_s=0.0, poll_s=0.01)).lock("me"):
        assert json.loads(store.read_bytes("tables", "scores", V, LOCK))["run_id"] == "me"


def test_a_garbage_lock_file_is_waited_on_without_spinning_then_taken_over(store, monkeypatch):
    store.write_bytes(["tables", "scores", V, LOCK], b"\x00not json")
    reads = 0
    real_read = store.read_bytes

    def read_bytes(*parts: str) -> bytes:
        nonlocal reads
        reads += parts[-1] == LOCK
        return real_read(*parts)

    monkeypatch.setattr(store, "read_bytes", read_bytes)
    sleeps = _count_sleeps(monkeypatch)
    t0 = time.monotonic()
    with ScoreLedger(store, V, LockTiming(stale_s=0.2, wait_s=5.0, poll_s=0.05)).lock("me"):
        assert time.monotonic() - t0 >= 0.2  # held by an unknown run until it stayed unreadable for stale_s
        assert json.loads(real_read("tables", "scores", V, LOCK))["run_id"] == "me"
    assert 4 <= len(sleeps) <= 12 and reads <= 30
    assert not store.exists("tables", "scores", V, LOCK)


def test_a_garbage_lock_file_times_out_naming_an_unknown_holder(store, monkeypatch):
    store.write_bytes(["tables", "scores", V, LOCK], b"{}")
    sleeps = _count_sleeps(monkeypatch)
    with pytest.raises(TimeoutError, match="unknown run"):
        with ScoreLedger(store, V, LockTiming(stale_s=60.0, wait_s=0.1, poll_s=0.02)).lock("me"):
            pass
    assert 3 <= len(sleeps) <= 10
    assert store.read_bytes("tables", "scores", V, LOCK) == b"{}"  # not taken over before stale_s


class _VanishingLockStore(Store):
    """A lock file that always exists at create time and is always gone by the time it is read."""

    def write_bytes(self, parts, data, exclusive=False):
        if exclusive:
            raise FileExistsError(self.url(*parts))
        return super().write_bytes(parts, data, exclusive)


def test_a_lock_that_vanishes_between_create_and_read_does_not_spin(tmp_path, monkeypatch):
    store = _VanishingLockStore(str(tmp_path / "store"))
    sleeps = _count_sleeps(monkeypatch)
    with pytest.raises(TimeoutError, match="unknown run"):
        with MergeLock(store, ["merge.lock"], "me", LockTiming(stale_s=60.0, wait_s=0.1, poll_s=0.02)):
            pass
    assert 3 <= len(sleeps) <= 10


def test_the_lock_is_released_on_exit_and_on_an_exception(ledger, store):
    with ledger.lock("a"):
        assert store.exists("tables", "scores", V, LOCK)
    assert not store.exists("tables", "scores", V, LOCK)
    with pytest.raises(RuntimeError, match="boom"):
        with ledger.lock("a"):
            raise RuntimeError("boom")
    assert not store.exists("tables", "scores", V, LOCK)
    with ScoreLedger(store, V, LockTiming(wait_s=0.0, poll_s=0.01)).lock("b"):  # free at once
        pass


def test_a_lock_taken_over_from_a_slow_holder_is_not_removed_by_it(ledger, store):
    with ledger.lock("slow"):
        store.delete("tables", "scores", V, LOCK)  # as a waiter that judged it stale would, then took it
        store.write_bytes(["tables", "scores", V, LOCK], b'{"run_id": "next", "time": 0}')
    assert store.read_bytes("tables", "scores", V, LOCK) == b'{"run_id": "next", "time": 0}'


def test_bad_lock_timing_is_refused(store):
    with pytest.raises(ValueError, match="poll_s"):
        MergeLock(store, ["merge.lock"], "me", LockTiming(poll_s=0.0))


def test_null_and_string_key_parts_stay_apart(ledger, store):
    """The columnar keys tell a null hash or error from any string, "-" included."""
    ledger.write_part("a", 0, [row("x", None, "a", error="-"), row("x", "-", "a", error="-"),
                               row("x", "-", "a"), row("x", None, "a", error=None)])
    assert ledger.merge("a", stale_after_s=3600).duplicates == 0
    ledger.write_part("b", 0, [row("x", None, "b", error="-"), row("x", "-", "b"), row("y", None, "b", error="-")])
    assert ledger.merge("b", stale_after_s=3600).duplicates == 2
    assert len(ledger.rows()) == 5


def test_a_merge_reads_only_its_own_urls_keys_from_earlier_tables(ledger, store, monkeypatch):
    """Earlier merged tables are read row group by row group and only the keys of this run's URLs are
    kept: the merge's memory follows the run, not the version's history."""
    monkeypatch.setattr(ledger_mod, "SCORES_ROW_GROUP", 4)
    ledger.write_part("old", 0, [row(f"u{i:03d}", run_id="old") for i in range(40)])
    ledger.merge("old", stale_after_s=3600)
    with store.open_parquet("tables", "scores", V, "old.parquet") as pf:
        assert pf.metadata.num_row_groups == 10
    kept: list[int] = []
    real = ledger_mod.ScoreLedger._merged_keys

    def spy(self, names, urls):
        out = list(real(self, names, urls))
        kept.append(len(out))
        return iter(out)

    monkeypatch.setattr(ledger_mod.ScoreLedger, "_merged_keys", spy)
    ledger.write_part("new", 0, [row("u005", run_id="new"), row("u039", run_id="new"), row("v", run_id="new")])
    result = ledger.merge("new", stale_after_s=3600)
    assert kept == [2] and result.duplicates == 2
    assert store.read_table("tables", "scores", V, "new.parquet")["image_url"].to_pylist() == ["v"]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_merge_streams_ordered_parts_into_full_sorted_row_groups(ledger, store, monkeypatch, overlap):
    """Parts in URL order (shards cut from the listing) are merged one at a time into row groups of
    SCORES_ROW_GROUP rows, sorted by URL, duplicates dropped across part edges; overlapping parts (a
    retried task relisting) give the same table through the in-memory path."""
    monkeypatch.setattr(ledger_mod, "SCORES_ROW_GROUP", 4)
    ledger.write_part("old", 0, [row("u03", run_id="old")])
    ledger.merge("old", stale_after_s=3600)
    urls = [f"u{i:02d}" for i in range(10)]
    shards = [urls[0:4], urls[3:7], urls[7:10]]  # u03 repeats across the first edge and was merged before
    if overlap:
        shards.append(urls[1:3])  # a retry relisted from the start: u01, u02 again
    for i, shard in enumerate(shards):
        rows = [row(u, run_id="r") for u in shard]
        ledger.write_part("r", i, rows[::-1] + [row(shard[0], None, "r", error="OSError: gone")])  # unsorted part
    logs = []
    result = ledger.merge("r", stale_after_s=3600, log=type("L", (), {"info": lambda self, *a: logs.append(a)})())
    with store.open_parquet("tables", "scores", V, "r.parquet") as pf:
        groups = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        got = pf.read()
    oks = [u for u, e in zip(got["image_url"].to_pylist(), got["error"].to_pylist()) if e is None]
    assert oks == [u for u in urls if u != "u03"]
    assert got["image_url"].to_pylist() == sorted(got["image_url"].to_pylist())
    errors = {"u00", "u03", "u07"} | ({"u01"} if overlap else set())
    assert sorted(u for u, e in zip(got["image_url"].to_pylist(), got["error"].to_pylist()) if e) == sorted(errors)
    assert groups[:-1] == [4] * (len(groups) - 1) and sum(groups) == 9 + len(errors)
    rows_written = sum(len(s) + 1 for s in shards)
    assert result.duplicates == rows_written - sum(groups)
    assert any("in memory" in a[0] for a in logs) == overlap


def test_an_unchanged_image_under_a_new_signature_is_recorded_apart_from_the_scores(ledger, store):
    ledger.write_part("a", 0, [{**row("x", "hx", "a"), "listing_signature": "10:1"}, row("y", "hy", "a")])
    ledger.merge("a", stale_after_s=3600)
    # run b read x again (touched: new mtime), found its content scored, and only recorded the signature
    assert ledger.write_signatures("b", 0, []) is None
    ledger.write_signatures("b", 0, [{"image_url": "x", "content_hash": "hx", "listing_signature": "10:2",
                                      "method": "lafite"}])
    with ledger.lookup() as lookup:  # an unmerged run's signatures count already
        assert {k.listing_signature for k in lookup.take(["x"])["x"]} == {"10:1", "10:2"}
    result = ledger.merge("b", stale_after_s=3600)
    assert result.table is None  # no new score rows
    assert store.exists("tables", "scores", V, "signatures", "b.parquet")
    assert store.listdir("tables", "scores", V, "parts") == []
    with ledger.lookup() as lookup:
        got = lookup.take(["x", "y"])
    assert {k.listing_signature for k in got["x"]} == {"10:1", "10:2"} and {k.content_hash for k in got["x"]} == {"hx"}
    with ledger.lookup("patchcore") as lookup:  # per method, like the scores
        assert lookup.take(["x"]) == {}
    assert sorted(ledger.rows()["image_url"].to_pylist()) == ["x", "y"]  # the score rows are unchanged
