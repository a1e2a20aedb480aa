"""Streaming dumps: the listing page by page, the sorted lookup of scored rows, shard manifests, and a
rerun that skips unchanged images without reading them."""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.core import url_to_fs

from lafite_core.datapath import listing as listing_mod
from lafite_core.datapath.data import _url
from lafite_core.datapath.images import IMAGE_EXTENSIONS
from lafite_core.datapath.listing import ListedObject, iter_listing
from lafite_core.store import ledger as ledger_mod
from lafite_core.store.ledger import ScoreLedger
from lafite_core.store.shards import ShardItem, ShardManifest, plan_shards
from lafite_core.store.storage import Store
from lafite_core.store.tables import SCORES_SCHEMA, conform_scores

V = "v1"


def _tree(root: Path) -> None:
    """Nested folders whose names sort differently as whole paths and as folder names ("a-b" < "a/")."""
    for rel in ["a.png", "a/1.png", "a/c/2.PNG", "a-b/3.jpg", "a0.png", "x y/ä.png", "z/readme.txt", "b.tif",
                "deep/1/2/3/4.bmp"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    os.symlink("/nonexistent", root / "broken.png")


def _find(url: str) -> list[str]:
    """The listing as fs.find gives it (what list_images returned before it streamed)."""
    fs, path = url_to_fs(url)
    return sorted(_url(fs, p) for p in fs.find(path) if p.lower().endswith(IMAGE_EXTENSIONS))


def _urls(pages) -> list[str]:
    return [o.url for page in pages for o in page]


def test_local_listing_comes_in_pages_in_path_order_with_signatures(tmp_path):
    _tree(tmp_path / "d")
    pages = list(iter_listing(str(tmp_path / "d"), page_size=3))
    assert [len(p) for p in pages] == [3, 3, 3]
    assert _urls(pages) == _find(str(tmp_path / "d"))  # the same images, in sorted order
    by_url = {o.url: o for p in pages for o in p}
    st = os.stat(tmp_path / "d" / "a.png")
    assert by_url[str(tmp_path / "d" / "a.png")] == ListedObject(str(tmp_path / "d" / "a.png"), st.st_size,
                                                                  f"{st.st_size}:{st.st_mtime_ns}")
    assert by_url[str(tmp_path / "d" / "broken.png")].signature is None  # listed, refused when read


def test_local_listing_is_lazy(tmp_path, monkeypatch):
    root = tmp_path / "d"
    for i in range(20):
        (root / f"f{i:02d}").mkdir(parents=True)
        (root / f"f{i:02d}" / "x.png").write_bytes(b"x")
    calls = []
    real = os.scandir
    monkeypatch.setattr(listing_mod.os, "scandir", lambda p: calls.append(p) or real(p))
    pages = iter_listing(str(root), page_size=2)
    first = next(pages)
    assert [o.url for o in first] == [str(root / "f00" / "x.png"), str(root / "f01" / "x.png")]
    assert len(calls) <= 4  # the root and the folders of the first page, not all 21
    assert len(_urls(pages)) == 18 and len(calls) == 21


def test_a_missing_source_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        next(iter_listing(str(tmp_path / "nothing")))


def test_other_fsspec_filesystems_are_walked_in_order():
    fs = fsspec.filesystem("memory")
    for rel in ["b.png", "a/2.png", "a-b/1.png", "a/z.txt"]:
        fs.pipe(f"/streamdump/{rel}", b"x")
    urls = _urls(iter_listing("memory://streamdump", page_size=2))
    assert urls == _find("memory://streamdump") and len(urls) == 3


def test_s3_listing_is_paged_by_the_service_and_lazy(moto_s3, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=moto_s3.endpoint)
    fs.mkdir("stream-list")
    keys = [f"dump/{c}/{i:03d}.png" for c in ("a", "a-b", "b") for i in range(7)] + ["dump/notes.txt"]
    for k in keys:
        fs.pipe(f"stream-list/{k}", k.encode())
    fs.pipe("stream-list/dumpling/x.png", b"not under the prefix")
    opts = {"endpoint_url": moto_s3.endpoint}
    calls = []
    real = s3fs.S3FileSystem.call_s3

    def counting(self, method, *args, **kwargs):
        calls.append((method, kwargs.get("MaxKeys")))
        return real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", counting)
    pages = iter_listing("s3://stream-list/dump", opts, page_size=4)
    first = next(pages)
    assert calls == [("list_objects_v2", 4)]  # one page listed before the first is yielded
    rest = list(pages)
    urls = [o.url for o in first] + _urls(rest)
    assert urls == sorted(f"s3://stream-list/{k}" for k in keys if k.endswith(".png"))
    assert len(calls) == 6 and all(len(p) <= 4 for p in [first, *rest])
    etag = fs.info("stream-list/dump/a-b/000.png")["ETag"]  # "a-b/" sorts before "a/"
    assert first[0] == ListedObject("s3://stream-list/dump/a-b/000.png", 16, f"16:{etag}")


# --------------------------------------------------------------------------- lookup


def row(url: str, digest: str = "h", signature: str | None = "s", error: str | None = None,
        method: str = "lafite", run_id: str = "r") -> dict:
    return {"image_url": url, "content_hash": digest, "listing_signature": signature, "category": None,
            "raw_score": None if error else 1.0, "normalized_score": None, "decision": None, "model_version": V,
            "method": method, "run_id": run_id, "heatmap_url": None, "error": error,
            "scored_at": datetime.now(timezone.utc)}


@pytest.fixture
def ledger(tmp_path) -> ScoreLedger:
    return ScoreLedger(Store(str(tmp_path / "store")), V)


def test_lookup_streams_sorted_tables_row_group_by_row_group(ledger, monkeypatch):
    monkeypatch.setattr(ledger_mod, "SCORES_ROW_GROUP", 10)
    ledger.write_part("a", 0, [row(f"u{i:03d}", f"h{i}", f"s{i}") for i in range(0, 100, 2)]
                      + [row("u001", "bad", error="OSError"), row("u003", "pc", method="patchcore")])
    ledger.merge("a", stale_after_s=3600)
    ledger.write_part("live", 0, [row("u004", "h4b", "s4b", run_id="live"), row("u099", "h99", "s99")])
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **kw: reads.append(i) or real(self, i, **kw))
    with ledger.lookup("lafite") as lookup:
        got = lookup.take(["u000", "u001", "u003", "u004", "u005"])
        assert reads == [0]  # only the first row group (u000..u018) so far
        assert got == {"u000": [("h0", "s0")], "u004": [("h4", "s4"), ("h4b", "s4b")]}  # errors, other methods: none
        assert lookup.take(["u050", "u052"]) == {"u050": [("h50", "s50")], "u052": [("h52", "s52")]}
        assert reads == [0, 1, 2]  # u016..u034 passed over, u036..u054 read; u056.. not yet
        assert lookup.take(["u099"]) == {"u099": [("h99", "s99")]}  # from the live run's part
        with pytest.raises(ValueError, match="ascending"):
            lookup.take(["u010"])
    assert pq.ParquetFile(ledger.store.path("tables", "scores", V, "a.parquet")).metadata.num_row_groups == 6


def test_old_tables_without_signatures_and_unsorted_tables_are_still_read(ledger):
    old = pa.Table.from_pylist([{k: v for k, v in row(u, "h" + u).items() if k != "listing_signature"}
                                for u in ("c", "a", "b")])
    ledger.store.write_table(["tables", "scores", V, "old.parquet"], old, row_group_size=2)  # unsorted groups
    assert ledger.rows().schema == SCORES_SCHEMA and ledger.rows()["listing_signature"].null_count == 3
    assert conform_scores(old).column_names == SCORES_SCHEMA.names
    with ledger.lookup("lafite") as lookup:
        assert lookup.take(["a", "b", "c"]) == {u: [("h" + u, None)] for u in "abc"}
    assert ledger.scored_keys() == {("a", "ha"), ("b", "hb"), ("c", "hc")}


# --------------------------------------------------------------------------- shards


def test_plan_skips_unchanged_images_unread_and_fills_shards_with_the_rest(ledger, tmp_path):
    ledger.write_part("a", 0, [row(f"/src/{i:02d}.png", f"h{i}", f"sig{i}") for i in range(10)])
    ledger.merge("a", stale_after_s=3600)
    listed = [ListedObject(f"/src/{i:02d}.png", 1, f"sig{i}" if i % 3 else f"changed{i}") for i in range(14)]
    pages = [listed[:5], listed[5:10], listed[10:]]
    with ledger.lookup() as lookup:
        steps = list(plan_shards(iter(pages), lookup, 3, "/src"))
    assert sum(s.listed for s in steps) == 14
    skipped = [u for s in steps for u in s.skipped]
    shards = [s.items for s in steps if s.items]
    assert skipped == [f"/src/{i:02d}.png" for i in (1, 2, 4, 5, 7, 8)]
    assert [len(s) for s in shards] == [3, 3, 2]  # only images to read fill a shard
    items = {i.url: i for s in shards for i in s}
    assert items["/src/03.png"] == ShardItem("/src/03.png", "changed3", ("h3",))  # read; rescored if its hash differs
    assert items["/src/13.png"] == ShardItem("/src/13.png", "sig13", ())  # never scored


def test_a_link_outside_the_source_is_never_skipped(tmp_path, ledger):
    (tmp_path / "out.png").write_bytes(b"x")
    (tmp_path / "src").mkdir()
    os.symlink(tmp_path / "out.png", tmp_path / "src" / "l.png")
    (obj,) = next(iter_listing(str(tmp_path / "src")))
    ledger.write_part("a", 0, [row(obj.url, "h", obj.signature)])
    with ledger.lookup() as lookup:
        steps = list(plan_shards([[obj]], lookup, 4, str(tmp_path / "src")))
    assert [u for s in steps for u in s.skipped] == [] and [i.url for s in steps for i in s.items] == [obj.url]


def test_manifests_round_trip_and_live_beside_the_parts(ledger):
    m = ShardManifest("r", 7, "s3://b/dump", (ShardItem("s3://b/dump/a.png", '3:"e"', ("h1", "h2")),
                                               ShardItem("s3://b/dump/b.png", None)))
    url = ledger.write_manifest("r", 7, m.to_bytes())
    assert url.endswith("tables/scores/v1/parts/r/manifests/shard-00007.json")
    assert ShardManifest.from_bytes(ledger.read_manifest("r", 7)) == m
    ledger.merge("r", stale_after_s=3600)
    assert not ledger.store.exists("tables", "scores", V, "parts", "r")  # removed with the run's parts


# --------------------------------------------------------------------------- the flow


def test_rerun_reads_no_image_and_a_changed_file_is_rescored(prefect_harness, trained_store, small_demo, tmp_path,
                                                            monkeypatch):
    import ray

    import lafite_core.datapath.data as data_mod
    import tasks.scoring as scoring
    from flows.batch_score import batch_score_flow
    from flows.params import ScoreParams

    store = str(tmp_path / "store")
    shutil.copytree(trained_store, store)
    dump = tmp_path / "dump"
    images = sorted(small_demo.path.glob("*/test/*/*.png"))[:6]
    for i, img in enumerate(images):
        (dump / img.parts[-4]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(img, dump / img.parts[-4] / f"{i:02d}.png")
    params = ScoreParams(source=str(dump), store=store, shard_size=4)
    first = batch_score_flow(params)
    assert (first.listed, first.scored, first.skipped, first.errors) == (6, 6, 0, 0)

    def no_read(*args, **kwargs):
        raise AssertionError("an image was read on a rerun with nothing new")

    monkeypatch.setattr(scoring, "read_bytes", no_read)
    monkeypatch.setattr(data_mod, "read_bytes", no_read)
    ray.shutdown()  # Ray must not even start: no shard has anything to read
    again = batch_score_flow(params)
    assert (again.listed, again.scored, again.skipped, again.errors, again.table_url) == (6, 0, 6, 0, None)
    assert not ray.is_initialized()
    assert sum(c.skipped for c in again.categories) == 6 and all(c.category.startswith("demo/")
                                                                 for c in again.categories)
    monkeypatch.undo()

    changed = sorted(dump.glob("*/*.png"))[0]
    other = sorted(dump.glob("*/*.png"))[-1]
    changed.write_bytes(other.read_bytes())  # new content
    touched = sorted(dump.glob("*/*.png"))[1]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # same content
    third = batch_score_flow(params)
    assert (third.listed, third.scored, third.skipped, third.errors) == (6, 1, 5, 0)
    rows = pq.read_table(third.table_url).to_pylist()
    st = changed.stat()
    assert [(r["image_url"], r["listing_signature"]) for r in rows] == [(str(changed), f"{st.st_size}:{st.st_mtime_ns}")]
    all_rows = ScoreLedger(Store(store), first.model_version).rows().to_pylist()
    assert len(all_rows) == 7 and len({(r["image_url"], r["content_hash"]) for r in all_rows}) == 7
    # the touched file was read once and found unchanged: its new signature is recorded (not as a score
    # row), so the next rerun reads nothing at all
    sigs = ScoreLedger(Store(store), first.model_version).lookup()
    with sigs as lookup:
        known = lookup.take([str(touched)])[str(touched)]
    st = touched.stat()
    assert f"{st.st_size}:{st.st_mtime_ns}" in {k.listing_signature for k in known}
    monkeypatch.setattr(scoring, "read_bytes", no_read)
    monkeypatch.setattr(data_mod, "read_bytes", no_read)
    fourth = batch_score_flow(params)
    assert (fourth.listed, fourth.scored, fourth.skipped, fourth.errors, fourth.table_url) == (6, 0, 6, 0, None)
    assert len(ScoreLedger(Store(store), first.model_version).rows()) == 7
    ray.shutdown()


def test_a_retried_run_numbers_its_shards_after_those_it_wrote(ledger):
    assert ledger.next_shard("r") == 0
    ledger.write_part("r", 0, [row("a")])
    ledger.write_manifest("r", 3, ShardManifest("r", 3, "/src", ()).to_bytes())  # submitted, not finished
    assert ledger.next_shard("r") == 4 and ledger.next_shard("other") == 0
