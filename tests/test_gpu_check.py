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


# A Python that has torch and the rest but not lafite itself (a GPU machine's own interpreter): this
# one drops the editable install's import hook, then runs ``-c CODE`` or a script as python would.
_NOT_INSTALLED = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                    and "__editable__" not in type(f).__module__]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
args = sys.argv[1:]
if args[0] == "-c":
    sys.argv = ["-c", *args[2:]]
    sys.path[0] = ""
    exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
else:
    sys.argv = args
    sys.path[0] = __import__("os").path.dirname(args[0])
    runpy.run_path(args[0], run_name="__main__")
"""


def _python_without_lafite(tmp_path) -> str:
    wrap = tmp_path / "not_installed.py"
    wrap.write_text(_NOT_INSTALLED)
    exe = tmp_path / "python-no-lafite"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} {wrap} "$@"\n')
    exe.chmod(0o755)
    # the wrapper is what the test claims: lafite is not importable through it from elsewhere
    gone = subprocess.run([str(exe), "-c", "import lafite_core"], cwd=tmp_path, capture_output=True, text=True)
    assert gone.returncode != 0 and "No module named 'lafite_core'" in gone.stderr
    return str(exe)


def test_gpu_sh_runs_the_check_with_a_python_that_has_torch_but_not_lafite(tmp_path):
    env = {**_fake_gpu_env(tmp_path), "LAFITE_PYTHON": _python_without_lafite(tmp_path)}
    out = tmp_path / "smoke"
    done = subprocess.run(["bash", "bench/gpu.sh", "--cpu-smoke", "--out", str(out)], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "using " in done.stdout and "python-no-lafite (torch" in done.stdout
    assert json.loads(out.with_suffix(".json").read_text())["cpu_smoke"]


def test_gpu_sh_refuses_a_python_without_the_dependencies(tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    env = {**_fake_gpu_env(tmp_path), "LAFITE_PYTHON": str(bare / "bin" / "python")}
    done = subprocess.run(["bash", "bench/gpu.sh", "--help"], cwd=PROJECT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 3
    assert "cannot import the project's dependencies" in done.stderr  # and no fallback to another Python
    assert "using" not in done.stdout
