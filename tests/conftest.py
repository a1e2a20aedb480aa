"""Shared fixtures: paths to the real data beside the project, and skips that say why."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "mpdd" / "metal_plate" / "train" / "good").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (expected ../shared/data beside the project)")
    return SHARED_DATA


TINY = {
    "diffusion": {"base_channels": 16, "channel_mult": (1, 2), "epochs": 8, "batch_size": 8, "lr": 1e-3,
                  "checkpoint_every": 1, "warm_start_fraction": 0.25},  # a warm start: 2 epochs
    # 4 of each category's 6 or more pseudo-validation images: every flow and fit here runs the subset path
    "search": {"taus": (50, 200), "ks": (1, 3), "ddim_steps": (1, 2), "images_per_category": 4},
    "scoring": {"ddim_steps": 2},
}


@pytest.fixture(scope="session")
def tiny_overrides() -> dict:
    """Config updates that make a full training run take seconds (small U-Net, 8 tiny epochs)."""
    return TINY


def cli_overrides(overrides: dict) -> list[str]:
    """The same updates as ``lafite`` command-line options (--set SECTION.FIELD=JSON)."""
    import json

    out = []
    for section, fields in overrides.items():
        for field, value in fields.items():
            out += ["--set", f"{section}.{field}={json.dumps(list(value) if isinstance(value, tuple) else value)}"]
    return out


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API for the whole session (flows need one; ~10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """A small generated multi-class dataset (3 categories, 6 train / 2 good / 2+2 defect test each)."""
    from flows.demo_data import DemoSpec, generate_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    spec = DemoSpec(train_per_category=6, test_good_per_category=2, test_defect_per_type=2)
    return generate_demo_dataset(root, spec, seed=1)


@pytest.fixture()
def fresh_ray():
    """Ray restarted so that its workers inherit the environment the test set up."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


class MotoS3:
    """A moto S3 server on 127.0.0.1 that can be stopped and restarted on the same port (data kept)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.port = self.server._server.server_port
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()


PLANTED_SECRET = "lafite-planted-secret-7f3a9c1e5b"


@pytest.fixture(scope="session")
def moto_s3():
    """Moto S3 on loopback, with fake credentials in the environment; the secret key is a planted
    value that tests look for in every output (it must never appear)."""
    server = MotoS3()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "LAFITE_S3_ENDPOINT")}
    os.environ.update(AWS_ACCESS_KEY_ID="lafite-test-key", AWS_SECRET_ACCESS_KEY=PLANTED_SECRET,
                      LAFITE_S3_ENDPOINT=server.endpoint)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory, prefect_harness, small_demo, tiny_overrides) -> str:
    """A local store holding one model version trained (tiny config) on the small demo set.

    Shared by the session: tests that write into a store copy it first.
    """
    import ray

    from flows.params import TrainParams
    from flows.train import train_flow

    store = str(tmp_path_factory.mktemp("trained") / "store")
    train_flow(TrainParams(data_root=str(small_demo.root), store=store, overrides=tiny_overrides, evaluate=False))
    ray.shutdown()
    return store


@pytest.fixture(scope="session")
def prefect_api_env(prefect_harness) -> dict:
    """Environment that points subprocesses at the session's Prefect API (no temporary server each)."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}
