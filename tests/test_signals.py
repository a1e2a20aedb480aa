"""Ctrl-C and SIGTERM stop a CLI run within seconds, leave no process behind, and the rerun resumes."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import cli_overrides

LAFITE = str(Path(sys.executable).with_name("lafite"))


def _training(store: Path, epochs: int) -> bool:
    ckpts = list(store.glob("checkpoints/*/train_state.pt"))
    return bool(ckpts) and 1 <= torch.load(ckpts[0], weights_only=True)["epoch"] < epochs


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_cli_cleanly_and_the_rerun_resumes(tmp_path, small_demo, tiny_overrides, sig):
    store = tmp_path / "store"
    # long enough to be caught mid-training, and to still be mid-training when the Ray worker that
    # trains has stopped (batches of 2: several seconds); its own temporary Prefect server and local
    # Ray, as a user runs it
    epochs = 60
    overrides = {**tiny_overrides, "diffusion": {**tiny_overrides["diffusion"], "epochs": epochs, "batch_size": 2}}
    args = [LAFITE, "train", "--data-root", str(small_demo.root), "--no-evaluate", "--store", str(store),
            *cli_overrides(overrides)]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 600
        while not _training(store, epochs):
            assert p.poll() is None, f"the run ended before it could be interrupted:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"training never started:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        children = psutil.Process(p.pid).children(recursive=True)
        assert children, "the run started no process of its own (Prefect server, Ray)"
        sent = time.monotonic()
        p.send_signal(sig)  # to the CLI process alone: the hard case (a terminal's Ctrl-C reaches the group)
        code = p.wait(timeout=60)
        stopped = time.monotonic() - sent
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    text = log.read_text()
    assert code == 128 + sig, f"exit code {code}:\n{text[-3000:]}"
    assert stopped < 20, f"took {stopped:.1f} s to stop"
    assert "interrupted" in text and "Traceback" not in text, text[-3000:]
    time.sleep(2)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {[(c.pid, ' '.join(c.cmdline())[:100]) for c in alive]}"
    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    resumed = re.search(r"resuming training from checkpoint \S+ at epoch (\d+)/(\d+)", rerun.stdout + rerun.stderr)
    assert resumed, (rerun.stdout + rerun.stderr)[-3000:]
    assert 1 <= int(resumed.group(1)) < int(resumed.group(2)) == epochs  # stopped mid-training, resumed there
