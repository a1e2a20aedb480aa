"""Kill the process during extraction, training and batch scoring; the rerun resumes and the final
outputs equal those of an uninterrupted run, with no duplicate and no missing rows."""

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lafite_core.config import cpu_profile
from lafite_core.method.model import LafiteModel
from lafite_core.store.storage import Store
from conftest import cli_overrides

LAFITE = str(Path(sys.executable).with_name("lafite"))


def _kill_when(cmd: list[str], ready, timeout: float, log: Path, env: dict | None = None) -> None:
    """Start ``cmd`` in its own session, SIGKILL the whole session once ``ready()`` is true."""
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if p.poll() is not None:
                raise AssertionError(f"{cmd[:3]} finished before it could be interrupted:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd[:3]} never reached the point to interrupt:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    _reap_ray()


def _reap_ray() -> None:
    """Ray processes of a killed driver exit on their own; wait until they have."""
    for _ in range(60):
        left = subprocess.run(["pgrep", "-f", "ray::|raylet|gcs_server"], capture_output=True, text=True).stdout
        own = [pid for pid in left.split() if int(pid) != os.getpid()]
        if not own:
            return
        time.sleep(0.5)


def _run(cmd: list[str], log: Path, env: dict | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    log.write_text(out.stdout + out.stderr)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout + out.stderr


def test_extraction_resumes_and_equals_an_uninterrupted_run(tmp_path, small_demo):
    script = tmp_path / "extract.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        import time
        from lafite_core.method.backbone import FeatureExtractor
        from lafite_core.config import cpu_profile
        from lafite_core.datapath.data import discover
        from lafite_core.store.feature_store import FeatureStore, extract_into
        from lafite_core.store.storage import Store
        cfg = cpu_profile()
        samples = [s for c in discover({str(small_demo.root)!r}) for s in c.train + c.test]

        class Paced(FeatureExtractor):
            # the run to be killed pauses before each batch so the test's poll sees it part-way on a
            # loaded machine; the kill then mostly lands in a pause, with the previous batch's write
            # possibly still in flight on the writer thread
            def forward(self, images):
                time.sleep(0.75)
                return super().forward(images)

        extractor = (Paced if sys.argv[2:] == ["paced"] else FeatureExtractor)(cfg.backbone)
        extract_into(FeatureStore(Store(sys.argv[1]), cfg), samples, extractor, batch_size=2)
    """))
    from lafite_core.store.feature_store import FeatureStore

    cfg = cpu_profile()
    interrupted = FeatureStore(Store(str(tmp_path / "a")), cfg)
    _kill_when([sys.executable, str(script), str(tmp_path / "a"), "paced"],
               lambda: len(interrupted.entries("demo", "bracket")) >= 4, 120, tmp_path / "kill.log")
    before = len(interrupted.entries("demo", "bracket"))
    assert 4 <= before < 12
    _run([sys.executable, str(script), str(tmp_path / "a")], tmp_path / "resume.log")
    _run([sys.executable, str(script), str(tmp_path / "b")], tmp_path / "clean.log")
    clean = FeatureStore(Store(str(tmp_path / "b")), cfg)
    for cat in ("bracket", "washer", "weave"):
        a = interrupted.entries("demo", cat)
        b = clean.entries("demo", cat)
        assert set(a) == set(b) and len(a) == 12  # 6 train, 2 good, 2 x 2 defects
        fa, _ = interrupted.read("demo", cat, sorted(b))
        fb, _ = clean.read("demo", cat, sorted(b))
        np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-4)


def _model(store: str) -> tuple[LafiteModel, dict]:
    s = Store(store)
    (version,) = s.list_versions()
    files = s.load_model_files(version.version)
    return LafiteModel.from_files(files), files


def test_training_resumes_from_its_checkpoint_and_equals_an_uninterrupted_run(
    tmp_path, small_demo, prefect_api_env, tiny_overrides
):
    # The tiny config's 8 epochs pass in under a second, so a kill seen at epoch 2 used to land after
    # the last checkpoint (the rerun "resumed" at 8/8). Here: 60 epochs of batches of 2, several seconds
    # of training, so the kill lands mid-training even though the Ray worker that trains outlives the
    # killed driver by a dozen epochs (it resumed at 14/30 in a trial run); the uninterrupted run uses
    # the same config.
    epochs = 60
    overrides = {**tiny_overrides, "diffusion": {**tiny_overrides["diffusion"], "epochs": epochs, "batch_size": 2}}
    args = [LAFITE, "train", "--data-root", str(small_demo.root), "--no-evaluate", *cli_overrides(overrides)]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")

    def checkpointed() -> bool:
        ckpts = list(Path(a).glob("checkpoints/*/train_state.pt"))
        if not ckpts:
            return False
        state = torch.load(ckpts[0], weights_only=True)
        return 2 <= state["epoch"] < epochs

    env = prefect_api_env
    _kill_when([*args, "--store", a], checkpointed, 300, tmp_path / "kill.log", env)
    assert not Store(a).list_versions()  # nothing was published by the killed run
    log = _run([*args, "--store", a], tmp_path / "resume.log", env)
    resumed = re.search(r"resuming training from checkpoint \S+ at epoch (\d+)/(\d+)", log)
    assert resumed, log[-3000:]
    assert 2 <= int(resumed.group(1)) < int(resumed.group(2)) == epochs  # mid-training, not after it
    _run([*args, "--store", b], tmp_path / "clean.log", env)
    (ma, fa), (mb, fb) = _model(a), _model(b)
    assert ma.config == mb.config
    for (k, x), y in zip(ma.unet.state_dict().items(), mb.unet.state_dict().values()):
        torch.testing.assert_close(x, y, msg=k)
    np.testing.assert_array_equal(ma.bank, mb.bank)
    assert (ma.tau, ma.k) == (mb.tau, mb.k)
    assert fa["calibration.json"] == fb["calibration.json"]
    # the same search, point for point; only the seconds each point took differ between runs
    search_a, search_b = (pq.read_table(io.BytesIO(f["search.parquet"])).drop(["seconds"]) for f in (fa, fb))
    assert search_a.equals(search_b) and search_a.schema.metadata == search_b.schema.metadata


def _all_rows(store: str) -> list[dict]:
    from lafite_core.store.ledger import read_score_tables

    s = Store(store)
    (version,) = s.list_versions()
    return read_score_tables(s, version.version).to_pylist()


def _uninterrupted(store: str, dump: Path) -> list[dict]:
    """The same dump scored in one piece, in this process, by the same shard code."""
    from lafite_core.datapath.data import list_images
    from tasks.scoring import score_shard_body

    s = Store(store)
    (version,) = s.list_versions()
    score_shard_body(store, version.version, "reference", 0, list_images(str(dump)), set(), str(dump), "lafite", False)
    return _all_rows(store)


def test_batch_scoring_continues_the_dump_after_a_kill(tmp_path, trained_store, small_demo, prefect_api_env):
    dump = tmp_path / "dump"
    dump.mkdir()
    images = sorted(small_demo.path.glob("*/test/*/*.png"))
    for i in range(60):  # long enough a run to be interrupted in the middle
        shutil.copyfile(images[i % len(images)], dump / f"{i:03d}.png")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shutil.copytree(trained_store, a)
    shutil.copytree(trained_store, b)
    args = [LAFITE, "score", str(dump), "--shard-size", "2"]

    def some_parts() -> bool:
        return len(list(Path(a).glob("tables/scores/*/parts/*/shard-*.parquet"))) >= 2

    env = prefect_api_env
    _kill_when([*args, "--store", a], some_parts, 300, tmp_path / "kill.log", env)
    assert not list(Path(a).glob("tables/scores/*/*.parquet"))  # the killed run merged nothing
    log = _run([*args, "--store", a, "--stale-after", "0"], tmp_path / "resume.log", env)
    assert "adopting the rows of interrupted run" in log
    ra, rb = _all_rows(a), _uninterrupted(b, dump)
    key = lambda r: (r["image_url"], r["content_hash"])  # noqa: E731
    assert len(ra) == len({key(r) for r in ra}) == 60  # no duplicate, none missing
    # shards of 2 vs one batch of 60: float32 sums in another order (1e-6 relative once scoring.position_norm
    # divides the errors by their normal std)
    assert {key(r): r["raw_score"] for r in ra} == pytest.approx({key(r): r["raw_score"] for r in rb}, rel=1e-5)
    assert {key(r): r["decision"] for r in ra} == {key(r): r["decision"] for r in rb}
    assert not list(Path(a).glob("tables/scores/*/parts/*"))  # adopted parts are cleaned up
    merged = list(Path(a).glob("tables/scores/*/*.parquet"))
    assert len(merged) == 1 and pq.read_table(merged[0]).num_rows == 60
