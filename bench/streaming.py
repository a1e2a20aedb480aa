"""Streaming dumps: listing rate, driver memory as the listing grows 10x, time to the first shard, and
a rerun with nothing new (issue 13, item 1).

Measured, each size in a fresh process (peak RSS is per process):

- ``listing``: ``iter_listing`` over a local folder of tiny files (in folders of 1,000), a moto S3
  prefix (127.0.0.1), and a simulated S3 listing (``list_pages`` on a stand-in whose
  ``list_objects_v2`` makes up keys: the code path of a real prefix without the objects).
- ``first``: the driver path of a first run on the local folder: listing, lookup of scored rows,
  ``plan_shards``, one manifest per shard. The shards themselves are a STUB, run in this process:
  each reads and hashes its images and writes its part with a fixed score (no model; scoring costs
  the same per image whether listed or streamed). Then the merge.
- ``rerun``: the same folder again through the real ``tasks.scoring.score_shards_task`` (its
  function, without Prefect; Ray is started only for a shard with something to read, and there is
  none), with every image read counted; then the merge step. For the simulated listing the rerun is
  ``plan_shards`` over a merged table of every key.

    .venv/bin/python bench/streaming.py            # local 20,000 / 200,000, moto 2,000 / 20,000,
                                                   # simulated 100,000 / 1,000,000
    .venv/bin/python bench/streaming.py --quick    # 2,000 / 20,000 local, 500 / 5,000 moto, 10x sim
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(PROJECT))

from bench.common import machine, out_stem, write_json, write_text  # noqa: E402

VERSION = "vbench"
SHARD = 64
REAL_RATE = 11.1  # images/s of real scoring, bench/results/load.md (10,000 images, this machine class)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> float:
    """Start measuring the peak RSS of what follows (Linux: clear_refs 5 resets VmHWM); the RSS now, MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak RSS since the last ``reset_peak`` (the process's whole life where it was never called), MB."""
    try:
        return _status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_local(folder: Path, n: int) -> None:
    """n tiny distinct files, 1,000 to a folder (a plant's dump: one folder per camera or hour)."""
    for i in range(n):
        d = folder / f"cam{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:07d}.png").write_bytes(b"\x89PNG" + i.to_bytes(8, "little"))


def fake_store(root: str) -> None:
    """A store with a published version holding only model.json (the driver reads its categories)."""
    from lafite_core.store.storage import Store

    Store(root).publish_model({"model.json": json.dumps({"categories": []}).encode()}, "bench", VERSION)


class SimulatedS3:
    """A stand-in for s3fs with the calls ``list_pages`` makes: keys made up on demand, 1,000 a page."""

    protocol = ("s3", "s3a")

    def __init__(self, n: int) -> None:
        self.n = n

    def split_path(self, path: str):
        bucket, _, key = path.partition("/")
        return bucket, key, None

    def unstrip_protocol(self, path: str) -> str:
        return "s3://" + path

    def key(self, prefix: str, i: int) -> str:
        return f"{prefix}cam{i // 1000:04d}/{i:07d}.png"

    def call_s3(self, method: str, Bucket: str, Prefix: str, MaxKeys: int, ContinuationToken: str | None = None):
        start = int(ContinuationToken or 0)
        end = min(self.n, start + MaxKeys)
        contents = [{"Key": self.key(Prefix, i), "Size": 12, "ETag": f'"{i:032x}"'} for i in range(start, end)]
        return {"Contents": contents, "IsTruncated": end < self.n, "NextContinuationToken": str(end)}


def child_listing(kind: str, source: str, n: int, endpoint: str | None) -> dict:
    from lafite_core.datapath.listing import iter_listing, list_pages

    if kind == "moto":
        import s3fs  # noqa: F401  (imported before measuring: part of the process, not of the listing)
    base = reset_peak()
    t0 = time.perf_counter()
    first = None
    count = 0
    if kind == "sim":
        pages = list_pages(SimulatedS3(n), "bucket/dump")
    else:
        pages = iter_listing(source, {"endpoint_url": endpoint} if endpoint else None)
    for page in pages:
        first = first if first is not None else time.perf_counter() - t0
        count += len(page)
    dt = time.perf_counter() - t0
    assert count == n, (count, n)
    return {"kind": kind, "n": n, "seconds": dt, "rate": n / dt, "first_page_s": first, "peak_rss_mb": peak_rss_mb(),
            "growth_mb": peak_rss_mb() - base}


def child_first(source: str, store_url: str, n: int) -> dict:
    """First run: the driver path for real, the shards a stub in this process (module docstring)."""
    from lafite_core.datapath.data import read_bytes
    from lafite_core.datapath.listing import iter_listing
    from lafite_core.store.ledger import ScoreLedger
    from lafite_core.store.shards import ShardManifest, plan_shards
    from lafite_core.store.storage import Store, content_hash

    store = Store(store_url)
    ledger = ScoreLedger(store, VERSION)
    run = "first"
    now = datetime.now(timezone.utc)
    base = reset_peak()
    t0 = time.perf_counter()
    first_shard, shards, stub_s, reads, listed = None, 0, 0.0, 0, 0
    with ledger.lookup("lafite") as lookup:
        for step in plan_shards(iter_listing(source), lookup, SHARD, source):
            listed += step.listed
            if not step.items:
                continue
            ledger.write_manifest(run, shards, ShardManifest(run, shards, source, step.items).to_bytes())
            first_shard = first_shard if first_shard is not None else time.perf_counter() - t0
            s0 = time.perf_counter()
            m = ShardManifest.from_bytes(ledger.read_manifest(run, shards))  # the STUB shard
            rows = []
            for item in m.items:
                digest = content_hash(read_bytes(item.url))
                reads += 1
                rows.append({"image_url": item.url, "content_hash": digest, "listing_signature": item.signature,
                             "model_version": VERSION, "method": "lafite", "run_id": run, "scored_at": now,
                             "raw_score": 0.0, "decision": "normal"})
            ledger.write_part(run, shards, rows)
            stub_s += time.perf_counter() - s0
            shards += 1
    driver_s = time.perf_counter() - t0 - stub_s
    driver_rss = peak_rss_mb() - base
    with_driver = peak_rss_mb()
    merge_base = reset_peak()
    m0 = time.perf_counter()
    merged = ledger.merge(run, 3600.0)
    merge_s = time.perf_counter() - m0
    merge_rss = peak_rss_mb() - merge_base
    assert listed == reads == n and merged.table, (listed, reads, n)
    return {"kind": "first", "n": n, "driver_s": driver_s, "stub_shards_s": stub_s, "merge_s": merge_s,
            "total_s": driver_s + stub_s + merge_s, "first_shard_s": first_shard, "shards": shards, "reads": reads,
            "driver_peak_rss_mb": driver_rss, "merge_peak_rss_mb": merge_rss,
            "peak_rss_with_merge_mb": max(with_driver, peak_rss_mb()) - base, "base_rss_mb": base}


def child_rerun(source: str, store_url: str, n: int) -> dict:
    """Rerun with nothing new through the real task function; every image read is counted."""
    import ray  # noqa: F401  (imported by the task whether or not it starts Ray: not part of the measure)

    import lafite_core.datapath.data as data
    import tasks.scoring as scoring
    from lafite_core.store.ledger import ScoreLedger
    from lafite_core.store.storage import Store

    reads = []
    for mod in (data, scoring):
        real = mod.read_bytes
        mod.read_bytes = lambda url, *a, _real=real, **k: reads.append(url) or _real(url, *a, **k)
    base = reset_peak()
    t0 = time.perf_counter()
    out = scoring.score_shards_task.fn(store_url, VERSION, "rerun", source, "lafite", False, SHARD)
    task_s = time.perf_counter() - t0
    merged = ScoreLedger(Store(store_url), VERSION).merge("rerun", 3600.0)
    total = time.perf_counter() - t0
    assert out.listed == out.skipped == n and out.shards == 0 and merged.table is None, out
    return {"kind": "rerun", "n": n, "task_s": task_s, "total_s": total, "reads": len(reads), "shards": out.shards,
            "skipped_unread": out.skipped_unread, "peak_rss_mb": peak_rss_mb() - base, "base_rss_mb": base}


def child_sim_table(n: int, store_url: str) -> dict:
    """A merged score table holding every key of the simulated n-key listing (written in its own process)."""
    import pyarrow as pa

    from lafite_core.store.storage import Store
    from lafite_core.store.tables import SCORES_ROW_GROUP, SCORES_SCHEMA

    fs = SimulatedS3(n)
    cols = {f.name: pa.nulls(n, f.type) for f in SCORES_SCHEMA}
    cols.update(image_url=pa.array([f"s3://bucket/{fs.key('dump/', i)}" for i in range(n)]),
                listing_signature=pa.array([f'12:"{i:032x}"' for i in range(n)]),
                content_hash=pa.array(["h"] * n), method=pa.array(["lafite"] * n))
    Store(store_url).write_table(["tables", "scores", VERSION, "first.parquet"], pa.table(cols, schema=SCORES_SCHEMA),
                                 row_group_size=SCORES_ROW_GROUP)
    return {"kind": "sim_table", "n": n}


def child_sim_rerun(n: int, store_url: str) -> dict:
    """plan_shards over a simulated n-key S3 listing beside the merged table of ``child_sim_table``."""
    from lafite_core.datapath.listing import list_pages
    from lafite_core.store.ledger import ScoreLedger
    from lafite_core.store.shards import plan_shards
    from lafite_core.store.storage import Store

    base = reset_peak()
    t0 = time.perf_counter()
    skipped = listed = shards = 0
    with ScoreLedger(Store(store_url), VERSION).lookup("lafite") as lookup:
        for step in plan_shards(list_pages(SimulatedS3(n), "bucket/dump"), lookup, SHARD, "s3://bucket/dump"):
            listed += step.listed
            skipped += len(step.skipped)
            shards += bool(step.items)
    dt = time.perf_counter() - t0
    assert listed == skipped == n and shards == 0
    return {"kind": "sim_rerun", "n": n, "seconds": dt, "rate": n / dt, "peak_rss_mb": peak_rss_mb() - base,
            "rss_before_mb": base}


def start_moto() -> tuple[object, str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    return server, f"http://127.0.0.1:{server._server.server_port}"


def fill_moto(endpoint: str, prefix: str, n: int) -> None:
    """n tiny objects under s3://bench/<prefix>/, 1,000 to a sub-prefix, put by 8 threads."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    if "bench" not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket="bench")

    def put(i: int) -> None:
        client.put_object(Bucket="bench", Key=f"{prefix}/cam{i // 1000:04d}/{i:07d}.png", Body=i.to_bytes(8, "little"))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(n)))


def child(argv: list[str]) -> dict:
    what = argv[0]
    if what == "listing":
        kind, source, n = argv[1], argv[2], int(argv[3])
        return child_listing(kind, source, n, argv[4] if len(argv) > 4 else None)
    if what == "first":
        return child_first(argv[1], argv[2], int(argv[3]))
    if what == "rerun":
        return child_rerun(argv[1], argv[2], int(argv[3]))
    if what == "sim_table":
        return child_sim_table(int(argv[1]), argv[2])
    if what == "sim_rerun":
        return child_sim_rerun(int(argv[1]), argv[2])
    raise SystemExit(f"unknown child {what}")


def run_child(*args: object, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-4000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print("  ", result, file=sys.stderr, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--local", type=int, nargs=2, default=None, help="local folder sizes (N, 10N)")
    ap.add_argument("--moto", type=int, nargs=2, default=None, help="moto S3 sizes")
    ap.add_argument("--sim", type=int, nargs=2, default=None, help="simulated S3 listing sizes")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", nargs="+", choices=["local", "moto", "sim"], default=None,
                    help="run only these sections; the others are kept from the existing <out>.json")
    ap.add_argument("--child", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    local = args.local or ([2_000, 20_000] if args.quick else [20_000, 200_000])
    moto = args.moto or ([500, 5_000] if args.quick else [2_000, 20_000])
    sim = args.sim or ([10_000, 100_000] if args.quick else [100_000, 1_000_000])
    m = machine()
    print(m.line(), file=sys.stderr)
    results: dict[str, list[dict]] = {"listing": [], "first": [], "rerun": [], "sim_rerun": []}
    stem = out_stem(args.out, "streaming", args.quick)
    only = set(args.only or ["local", "moto", "sim"])
    if args.only:  # keep the other sections' figures from the last full run
        old = json.loads(stem.with_suffix(".json").read_text())
        results["listing"] = [x for x in old["listing"] if x["kind"] not in only]
        for key, section in (("first", "local"), ("rerun", "local"), ("sim_rerun", "sim")):
            if section not in only:
                results[key] = old[key]
        local, moto, sim = (sizes if name in only else [] for name, sizes in
                            (("local", local), ("moto", moto), ("sim", sim)))
    tmp = Path(tempfile.mkdtemp(prefix="lafite-stream-"))
    try:
        for n in local:
            src, store = tmp / f"dump{n}", str(tmp / f"store{n}")
            t = time.perf_counter()
            make_local(src, n)
            print(f"local dump of {n} written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            fake_store(store)
            results["listing"].append(run_child("listing", "local", src, n))
            results["first"].append(run_child("first", src, store, n))
            results["rerun"].append(run_child("rerun", src, store, n))
            shutil.rmtree(src)
            shutil.rmtree(store)
        server, endpoint = start_moto() if moto else (None, None)
        try:
            for n in moto:
                t = time.perf_counter()
                fill_moto(endpoint, f"dump{n}", n)
                print(f"moto prefix of {n} written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
                results["listing"].append(run_child("listing", "moto", f"s3://bench/dump{n}", n, endpoint))
        finally:
            if server is not None:
                server.stop()
        for n in sim:
            results["listing"].append(run_child("listing", "sim", "-", n))
            run_child("sim_table", n, tmp / f"sim{n}")
            results["sim_rerun"].append(run_child("sim_rerun", n, tmp / f"sim{n}"))
            shutil.rmtree(tmp / f"sim{n}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    order = {"local": 0, "moto": 1, "sim": 2}
    results["listing"].sort(key=lambda x: (order.get(x["kind"], 3), x["n"]))
    write_json(stem.with_suffix(".json"), {"machine": m.line(), **results})
    text = report(m.line(), results)
    write_text(stem.with_suffix(".md"), text)
    print(text)


def report(machine_line: str, r: dict[str, list[dict]]) -> str:
    lines = ["# Streaming dumps (issue 13, item 1)", "", f"Machine: {machine_line}", "",
             "Each size in its own process. Memory is the driver's peak RSS during the measured step above its "
             "RSS at the step's start (Linux `clear_refs` resets the peak; the interpreter and imports, "
             "about 0.6 GB with torch, are not counted).", "", "## Listing", "",
             "| source | objects | seconds | objects/s | first page (s) | peak RSS growth (MB) |",
             "|---|---|---|---|---|---|"]
    for x in r["listing"]:
        lines.append(f"| {x['kind']} | {x['n']:,} | {x['seconds']:.1f} | {x['rate']:,.0f} | {x['first_page_s']:.3f} "
                     f"| {x['growth_mb']:.1f} |")
    lines += ["", "## First run and rerun with nothing new (local folder)", "",
              "First run: the real driver path (listing, lookup, plan, a manifest per shard of 64); the shards "
              "are a STUB in the same process that reads and hashes each image and writes its part with a "
              "fixed score: **no model scoring**. Rerun: the real `score_shards_task` function (Ray is not "
              "started: no shard has anything to read), then the merge step.", "",
              "| objects | first: driver (s) | stub shards (s) | merge (s) | time to first shard (s) | "
              "driver RSS growth (MB) | merge RSS growth (MB) | rerun (s) | rerun reads | rerun RSS growth (MB) | "
              "rerun / first (stub) | rerun / first (real scoring at "
              f"{REAL_RATE} img/s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for f, re_ in zip(r["first"], r["rerun"]):
        real_first = f["n"] / REAL_RATE + f["driver_s"] + f["merge_s"]
        lines.append(f"| {f['n']:,} | {f['driver_s']:.1f} | {f['stub_shards_s']:.1f} | {f['merge_s']:.1f} | "
                     f"{f['first_shard_s']:.3f} | {f['driver_peak_rss_mb']:.0f} | "
                     f"{f.get('merge_peak_rss_mb', f['peak_rss_with_merge_mb']):.0f} | "
                     f"{re_['total_s']:.1f} | {re_['reads']} | {re_['peak_rss_mb']:.0f} | "
                     f"{100 * re_['total_s'] / f['total_s']:.0f}% | {100 * re_['total_s'] / real_first:.2f}% |")
    if len(r["first"]) == 2:
        lines.append("\nThe merge streams the run's parts (in URL order, as the shards were cut) into full row "
                     "groups; it holds the run's URLs, the earlier tables' keys of those URLs and the compressed "
                     "output, not the run's rows (445 MB at 200,000 rows before it streamed). An image read again "
                     "and found unchanged records its new listing signature, so the run after a `touch` reads "
                     "nothing (tests/test_streaming.py).")
    lines += ["", "## Rerun over a simulated S3 listing", "",
              "`plan_shards` over `list_pages` on a stand-in S3 (keys made up page by page) beside one merged "
              "score table holding every key (row groups of 16,384): every image skipped unread.", "",
              "| objects | seconds | objects/s | peak RSS growth (MB) | RSS before the walk (MB) |",
              "|---|---|---|---|---|"]
    for x in r["sim_rerun"]:
        lines.append(f"| {x['n']:,} | {x['seconds']:.1f} | {x['rate']:,.0f} | {x['peak_rss_mb']:.0f} | "
                     f"{x['rss_before_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
