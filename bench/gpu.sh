#!/usr/bin/env bash
# GPU check of the `paper` profile: training steps/s, scoring images/s, peak GPU memory and CPU/GPU
# agreement (bench/gpu_check.py; results in bench/results/gpu.json and gpu.md).
#
# From a fresh clone on a GPU machine, the one command is:
#
#     bash bench/gpu.sh
#
# It runs the check with the first Python that already imports the project's dependencies:
# $LAFITE_PYTHON, then .venv/bin/python, then the machine's python3 (a GPU machine with no package index
# must have torch there: the venv of a build machine is far larger than what travels with a checkout).
# Only when none does, it creates .venv with the project's own `pip install -e .`, which needs a
# package index, and says so when that fails. The check runs under a 9-minute limit. Extra arguments
# go to gpu_check.py, e.g. `bash bench/gpu.sh --checkpoint /path/efficientnet_b4.pth` for real B4
# weights without the hub.
# Exits with status 2 and a message when no NVIDIA GPU is present, with 3 when no Python can run it.
set -euo pipefail
if [ -n "${LAFITE_PYTHON:-}" ] && [[ "$LAFITE_PYTHON" == */* ]]; then
    LAFITE_PYTHON="$(cd "$(dirname "$LAFITE_PYTHON")" && pwd)/$(basename "$LAFITE_PYTHON")"  # before the cd
fi
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "bench/gpu.sh: no NVIDIA GPU found (nvidia-smi is missing or lists no GPU); this check needs a GPU machine." >&2
    exit 2
fi
nvidia-smi -L

# the imports the check needs, from the project's source tree as gpu_check.py puts it on sys.path
probe="import sys; sys.path.insert(0, '.'); import torch, timm, faiss, lafite_core.method.model, lafite_core.method.backbone"
py=""
candidates=(.venv/bin/python python3)
if [ -n "${LAFITE_PYTHON:-}" ]; then
    candidates=("$LAFITE_PYTHON")  # asked for: that one or an error, never another
fi
for cand in "${candidates[@]}"; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "$probe" >/dev/null 2>&1; then
        py="$cand"
        break
    fi
done
if [ -z "$py" ]; then
    if [ -n "${LAFITE_PYTHON:-}" ]; then
        echo "bench/gpu.sh: LAFITE_PYTHON=$LAFITE_PYTHON cannot import the project's dependencies:" >&2
        "$LAFITE_PYTHON" -c "$probe" 2>&1 | tail -n 3 >&2 || true
        exit 3
    fi
    echo "bench/gpu.sh: no Python here imports the project's dependencies (torch, timm, faiss, ...);" \
         "creating .venv with 'pip install -e .' (needs a package index)"
    python3 -m venv .venv
    if ! .venv/bin/pip install -e .; then
        echo "bench/gpu.sh: 'pip install -e .' failed. On a machine without a package index, install torch," \
             "timm and the project's dependencies beforehand and point LAFITE_PYTHON at that Python." >&2
        exit 3
    fi
    py=.venv/bin/python
fi
echo "bench/gpu.sh: using $py ($("$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))"

exec timeout 540 "$py" bench/gpu_check.py "$@"
