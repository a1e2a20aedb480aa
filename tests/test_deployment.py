"""A real deployment on loopback: prefect server, process work pools and workers, prefect deploy,
prefect deployment run, and the runs complete with their Parquet output and their Prefect artifacts."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

PROJECT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture()
def prefect_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "LAFITE_PROJECT_DIR": str(PROJECT), "PREFECT": PREFECT}
    env.pop("PREFECT_API_KEY", None)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    procs = [server]
    try:
        _wait_for(healthy, 120, "the Prefect server")
        yield env, procs
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        log.close()


def _run_and_wait(env: dict, deployment: str, params: dict, timeout: float) -> tuple[str, dict]:
    """Start a run of ``deployment``; its flow run id and final state."""
    out = subprocess.run([PREFECT, "deployment", "run", deployment, "--params", json.dumps({"params": params})],
                         env=env, capture_output=True, text=True, check=True)
    run_id = next(line.split("UUID:")[1].strip() for line in out.stdout.splitlines() if "UUID:" in line)
    api = env["PREFECT_API_URL"]

    def finished():
        state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state"]
        return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    state = _wait_for(finished, timeout, f"flow run {run_id} of {deployment}", interval=2)
    return run_id, state


def _artifacts(api: str, **any_of: list[str]) -> dict[str, dict]:
    """The artifacts whose fields (flow_run_id, key, ...) are among the values given, by key."""
    body = {"artifacts": {field: {"any_": values} for field, values in any_of.items()}}
    response = httpx.post(f"{api}/artifacts/filter", json=body, timeout=10)
    response.raise_for_status()
    return {a["key"]: a for a in response.json()}


def test_deploy_and_run_on_loopback(prefect_server, tmp_path, small_demo, tiny_overrides):
    env, procs = prefect_server
    store = tmp_path / "store"
    env.update(LAFITE_DATA_ROOT=str(small_demo.root), LAFITE_STORE=str(store), LAFITE_DUMP=str(small_demo.path),
               LAFITE_PROFILE="cpu")
    setup = subprocess.run([str(PROJECT / "deployments" / "local.sh"), "setup"], env=env, capture_output=True,
                           text=True, cwd=tmp_path)
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    listed = subprocess.run([PREFECT, "deployment", "ls"], env=env, capture_output=True, text=True, check=True).stdout
    for name in ("train/nightly", "evaluate/on-demand", "batch_score/dump"):
        assert name in listed

    for pool in ("lafite-gpu",):  # the nightly training's pool; the CPU pool is exercised the same way
        log = open(tmp_path / f"worker-{pool}.log", "w")
        procs.append(subprocess.Popen([str(PROJECT / "deployments" / "local.sh"), "worker", pool], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    run_id, state = _run_and_wait(env, "train/nightly", {"data_root": str(small_demo.root), "store": str(store),
                                                 "overrides": tiny_overrides}, timeout=600)
    logs = "".join(p.read_text() for p in tmp_path.glob("worker-*.log"))
    assert state["type"] == "COMPLETED", (state, logs[-4000:])
    versions = [p.name for p in (store / "models").iterdir() if (p / "MANIFEST.json").exists()]
    assert len(versions) == 1
    metrics = list((store / "tables" / "metrics").glob("*.parquet"))
    assert len(metrics) == 1 and pq.read_table(metrics[0]).num_rows == 9

    # the run's page answers "how did it go": the metrics table and a summary naming the version and report
    reports = list((store / "reports").glob("*/index.html"))
    assert len(reports) == 1
    made = _artifacts(env["PREFECT_API_URL"], flow_run_id=[run_id])
    assert set(made) == {"lafite-train-metrics", "lafite-train-summary"}, made
    table = made["lafite-train-metrics"]
    assert table["type"] == "table"
    rows = json.loads(table["data"])
    assert len(rows) == 9 and {"category", "method", "image_auroc", "pixel_auroc", "aupro"} <= set(rows[0])
    summary = made["lafite-train-summary"]
    assert summary["type"] == "markdown"
    assert f"`{versions[0]}`" in summary["data"] and str(reports[0]) in summary["data"], summary["data"]
    # the evaluation it ran (a subflow run) has its own
    evaluation = _artifacts(env["PREFECT_API_URL"], key=["lafite-evaluate-metrics", "lafite-evaluate-summary"])
    assert set(evaluation) == {"lafite-evaluate-metrics", "lafite-evaluate-summary"}
    assert all(a["flow_run_id"] not in (None, run_id) for a in evaluation.values())
    assert str(reports[0]) in evaluation["lafite-evaluate-summary"]["data"]

