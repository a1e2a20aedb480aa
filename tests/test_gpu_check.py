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
