"""The prepared GPU check must run: its --cpu-smoke mode walks every stage on the CPU with tiny sizes.

No GPU machine has been lent to this project's sessions, so this is what keeps bench/gpu_check.py
from breaking unnoticed when the library changes (it did once: a model built with arguments the
library no longer took, and without PatchCore's bank).
"""

import json
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "smoke"
    done = subprocess.run([sys.executable, str(PROJECT / "bench" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["cpu_smoke"] and res["backbone"]["weights"].startswith("RANDOM")
    rows = [(r["method"], r["knn"].split(" ")[0]) for r in res["scoring"]]
    assert rows == [("lafite", "FaissKNN"), ("lafite", "TorchKNN"), ("lafite_no_edit", "-"), ("patchcore", "FaissKNN")]
    assert {r["precision"] for r in res["scoring"]} == {"fp32"} and res["baseline_bank"] == res["bank"] // 10
    assert all(r["score_max_abs"] == 0 for r in res["agreement"])  # CPU against CPU: identical
    pr = res["precision"]
    assert pr["train_fp32_steps_per_s"] > 0 and pr["train_bf16_steps_per_s"] > 0
    assert pr["score_max_rel"] < 0.05  # bf16 autocast stays close to fp32 even with random weights
    e2e = res["end_to_end"]
    assert [(r["method"], r["ddim_steps"]) for r in e2e] == [("patchcore", None), ("lafite", 2), ("lafite", 1)]
    assert all(r["images_per_s"] > 0 and r["images"] == 3 for r in e2e)
    text = out.with_suffix(".md").read_text()
    assert "CPU SMOKE RUN" in text and "LafitE vs PatchCore end to end" in text


def _fake_gpu_env(tmp_path) -> dict:
    """PATH with an nvidia-smi that lists one GPU, so bench/gpu.sh gets past its GPU check."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: fake'\n")
    smi.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_gpu_sh_runs_the_check_with_the_python_it_is_given(tmp_path):
    env = {**_fake_gpu_env(tmp_path), "LAFITE_PYTHON": sys.executable}
    done = subprocess.run(["bash", "bench/gpu.sh", "--help"], cwd=PROJECT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"using {sys.executable} (torch" in done.stdout and "--cpu-smoke" in done.stdout


def test_gpu_sh_refuses_a_python_without_the_dependencies(tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    env = {**_fake_gpu_env(tmp_path), "LAFITE_PYTHON": str(bare / "bin" / "python")}
    done = subprocess.run(["bash", "bench/gpu.sh", "--help"], cwd=PROJECT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 3
    assert "cannot import the project's dependencies" in done.stderr  # and no fallback to another Python
    assert "using" not in done.stdout
