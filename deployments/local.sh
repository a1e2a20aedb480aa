#!/usr/bin/env bash
# The deployment sequence on one machine, against a Prefect server on 127.0.0.1.
#   deployments/local.sh server    start the server (foreground)
#   deployments/local.sh setup     create the work pools and deploy every deployment in prefect.yaml
#   deployments/local.sh worker POOL   start a process worker for POOL (lafite-cpu or lafite-gpu)
# Environment: PREFECT_API_URL (default http://127.0.0.1:4200/api), LAFITE_DATA_ROOT, LAFITE_STORE,
# LAFITE_DUMP, LAFITE_PROFILE (cpu or paper), and for s3:// URLs AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY and optionally LAFITE_S3_ENDPOINT.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LAFITE_PROJECT_DIR="${LAFITE_PROJECT_DIR:-$here}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:4200/api}"
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
prefect="${PREFECT:-$here/.venv/bin/prefect}"
port="${PREFECT_API_URL##*:}"; port="${port%%/*}"

case "${1:-}" in
  server)
    exec "$prefect" server start --host 127.0.0.1 --port "$port"
    ;;
  setup)
    : "${LAFITE_DATA_ROOT:?set LAFITE_DATA_ROOT to the MVTec-layout data root}"
    export LAFITE_STORE="${LAFITE_STORE:-$here/lafite-store}"
    export LAFITE_DUMP="${LAFITE_DUMP:-$LAFITE_DATA_ROOT}"
    export LAFITE_PROFILE="${LAFITE_PROFILE:-cpu}"
    for pool in lafite-cpu lafite-gpu; do
      "$prefect" work-pool inspect "$pool" >/dev/null 2>&1 || "$prefect" work-pool create "$pool" --type process
    done
    cd "$here" && "$prefect" --no-prompt deploy --all
    ;;
  worker)
    pool="${2:?name the work pool: lafite-cpu or lafite-gpu}"
    # env --default-signal=INT: a worker started from a script otherwise ignores SIGINT/SIGTERM
    exec env --default-signal=INT "$prefect" worker start --pool "$pool" --type process
    ;;
  *)
    sed -n '2,9p' "$0"; exit 2
    ;;
esac
