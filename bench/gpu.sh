#!/usr/bin/env bash
# GPU check of the `paper` profile: training steps/s, scoring images/s, peak GPU memory and CPU/GPU
# agreement (bench/gpu_check.py; results in bench/results/gpu.json and gpu.md).
#
# From a fresh clone on a GPU machine, the one command is:
#
#     bash bench/gpu.sh
#
# It creates .venv with the project's own `pip install -e .` when .venv is missing (the only thing
# it installs) and then runs the check under a 9-minute limit. Extra arguments go to gpu_check.py,
# e.g. `bash bench/gpu.sh --checkpoint /path/efficientnet_b4.pth` for real B4 weights without the hub.
# Exits with status 2 and a message when no NVIDIA GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "bench/gpu.sh: no NVIDIA GPU found (nvidia-smi is missing or lists no GPU); this check needs a GPU machine." >&2
    exit 2
fi
nvidia-smi -L

if [ ! -x .venv/bin/python ]; then
    echo "bench/gpu.sh: creating .venv with 'pip install -e .' (the project's own dependencies only)"
    python3 -m venv .venv
    .venv/bin/pip install -e .
fi

exec timeout 540 .venv/bin/python bench/gpu_check.py "$@"
