"""Storage faults: injected errors are retried with backoff, then fail clearly with nothing corrupt
left behind; the S3 server stopped mid-run; two batch_score runs at once leave no duplicate rows."""

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs

from lafite_core.store.storage import IntegrityError, RetryPolicy, Store, StoreError

LAFITE = str(Path(sys.executable).with_name("lafite"))


class Flaky:
    """Wraps a filesystem method: raises ``exc`` for the first ``fails`` calls matching ``when``."""

    def __init__(self, fn, fails: int, exc: Exception, when=lambda *a, **k: True):
        self.fn, self.fails, self.exc, self.when, self.calls = fn, fails, exc, when, 0

    def __call__(self, *args, **kwargs):
        if self.when(*args, **kwargs) and self.calls < self.fails:
            self.calls += 1
            raise self.exc
        return self.fn(*args, **kwargs)


def test_transient_errors_are_retried_with_exponential_backoff(monkeypatch, caplog):
    store = Store("memory://faults-a", retry=RetryPolicy(attempts=4, base_delay=0.01))
    flaky = Flaky(store.fs.pipe_file, 2, ConnectionError("connection reset by peer"))
    monkeypatch.setattr(store.fs, "pipe_file", flaky)
    delays = []
    monkeypatch.setattr(time, "sleep", delays.append)
    with caplog.at_level(logging.WARNING):
        store.write_bytes(["a", "b.bin"], b"payload")
    assert store.read_bytes("a", "b.bin") == b"payload"
    assert flaky.calls == 2 and delays == [0.01, 0.02]
    assert caplog.text.count("retry") == 2 and "faults-a/a/b.bin failed (ConnectionError" in caplog.text


def test_persistent_errors_fail_clearly_and_leave_no_partial_version(monkeypatch):
    store = Store("memory://faults-b", retry=RetryPolicy(attempts=3, base_delay=0.0))
    flaky = Flaky(store.fs.pipe_file, 10**6, TimeoutError("read timed out"),
                  when=lambda path, *a, **k: path.endswith("MANIFEST.json"))
    monkeypatch.setattr(store.fs, "pipe_file", flaky)
    with pytest.raises(StoreError, match=r"faults-b/models/v1/MANIFEST.json failed after 3 attempts"):
        store.publish_model({"unet.pt": b"weights", "bank.npy": b"bank"}, "cafe", version="v1")
    assert flaky.calls == 3
    assert store.list_versions() == []  # the files are there, but the version is not visible
    assert store.exists("models", "v1", "unet.pt")
    with pytest.raises(IntegrityError, match="not a complete version"):
        store.resolve_version("v1")
    with pytest.raises(StoreError, match="no complete model version"):
        store.resolve_version()
    # non-transient errors are not retried
    denied = Flaky(store.fs.cat_file, 10**6, PermissionError("access denied"))
    monkeypatch.setattr(store.fs, "cat_file", denied)
    with pytest.raises(PermissionError):
        store.read_bytes("models", "v1", "unet.pt")
    assert denied.calls == 1


@pytest.fixture()
def s3_trained(moto_s3, trained_store, small_demo):
    """The trained model copied into a fresh bucket, plus an s3 dump of the 18 demo test images."""
    fs = s3fs.S3FileSystem(endpoint_url=moto_s3.endpoint)
    bucket = f"faults-{time.monotonic_ns()}"
    fs.mkdir(bucket)
    fs.put(trained_store + "/models", f"{bucket}/store/models", recursive=True)
    for i, img in enumerate(sorted(small_demo.path.glob("*/test/*/*.png"))):
        fs.put_file(str(img), f"{bucket}/dump/{i:03d}.png")
    return fs, bucket


def _score(bucket: str, outcome: dict) -> None:
    from flows.batch_score import batch_score_flow
    from flows.params import ScoreParams

    try:
        outcome["ok"] = batch_score_flow(ScoreParams(source=f"s3://{bucket}/dump", store=f"s3://{bucket}/store",
                                                     shard_size=2))
    except Exception as exc:  # examined by the test
        outcome["error"] = exc


def _wait_for_parts(fs, bucket: str, thread: threading.Thread, outcome: dict) -> None:
    deadline = time.monotonic() + 240
    while not fs.glob(f"{bucket}/store/tables/scores/*/parts/*/shard-*.parquet"):
        fs.invalidate_cache()
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.2)


def test_s3_server_stopped_mid_run_is_survived(prefect_harness, s3_trained, moto_s3, monkeypatch, fresh_ray):
    from lafite_core.store.ledger import read_score_tables

    fs, bucket = s3_trained
    monkeypatch.setenv("LAFITE_STORE_RETRIES", "8")  # up to ~1 minute of backoff
    monkeypatch.setenv("LAFITE_STORE_RETRY_DELAY", "0.5")
    outcome: dict = {}
    t = threading.Thread(target=_score, args=(bucket, outcome))
    t.start()
    _wait_for_parts(fs, bucket, t, outcome)
    moto_s3.stop()  # the object store goes away mid-run ...
    time.sleep(4)
    moto_s3.restart()  # ... and comes back with its data
    t.join(300)
    assert "error" not in outcome, outcome.get("error")
    store = Store(f"s3://{bucket}/store")
    (version,) = store.list_versions()
    rows = read_score_tables(store, version.version).to_pylist()
    keys = [(r["image_url"], r["content_hash"]) for r in rows]
    assert len(keys) == len(set(keys)) == 18 and all(r["error"] is None for r in rows)


def test_s3_server_gone_fails_clearly_with_nothing_corrupt(prefect_harness, s3_trained, moto_s3, monkeypatch,
                                                             fresh_ray):
    fs, bucket = s3_trained
    monkeypatch.setenv("LAFITE_STORE_RETRIES", "2")
    monkeypatch.setenv("LAFITE_STORE_RETRY_DELAY", "0.1")
    outcome: dict = {}
    t = threading.Thread(target=_score, args=(bucket, outcome))
    t.start()
    _wait_for_parts(fs, bucket, t, outcome)
    moto_s3.stop()
    try:
        t.join(600)
    finally:
        moto_s3.restart()
    assert "ok" not in outcome
    message = f"{type(outcome['error']).__name__}: {outcome['error']}"
    assert f"127.0.0.1:{moto_s3.port}" in message or "failed after 2 attempts" in message, message
    fs.invalidate_cache()
    assert not fs.glob(f"{bucket}/store/tables/scores/*/*.parquet")  # no merged table from a failed run
    for part in fs.glob(f"{bucket}/store/tables/scores/*/parts/*/shard-*.parquet"):
        pq.read_table(part, filesystem=fs)  # what was written is whole


def test_two_batch_score_runs_at_once_leave_no_duplicate_rows(tmp_path, trained_store, small_demo, prefect_api_env):
    from lafite_core.store.ledger import read_score_tables

    store = str(tmp_path / "store")
    shutil.copytree(trained_store, store)
    dump = tmp_path / "dump"
    dump.mkdir()
    for i, img in enumerate(sorted(small_demo.path.glob("*/test/*/*.png"))):
        shutil.copyfile(img, dump / f"{i:03d}.png")
    (dump / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    cmd = [LAFITE, "score", str(dump), "--store", store, "--shard-size", "3"]
    env = {**os.environ, **prefect_api_env, "LAFITE_RAY_CPUS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    s = Store(store)
    (version,) = s.list_versions()
    rows = read_score_tables(s, version.version).to_pylist()
    scored = [(r["image_url"], r["content_hash"]) for r in rows if r["error"] is None]
    errors = [r for r in rows if r["error"] is not None]
    assert len(scored) == len(set(scored)) == 18
    assert len(errors) == 1 and errors[0]["image_url"].endswith("broken.png")
    assert not list(Path(store).glob("tables/scores/*/parts/*")) and not list(Path(store).glob("**/merge.lock"))
    for table in Path(store).glob("tables/scores/*/*.parquet"):
        pq.read_table(table)  # every file is whole
