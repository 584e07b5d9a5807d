#!/usr/bin/env bash
# Stop ONLY the cluster started by start_cluster.sh (never `ray stop`, which kills every Ray process here).
#   infra/local/stop_cluster.sh [--keep-logs]
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/local_stack.py" cluster stop "$@"
