#!/usr/bin/env bash
# Start a two-node Ray cluster on this machine: head (CPU, data_node) + worker (trainer_node). Start S3 first.
#   infra/local/start_cluster.sh [--head-cpus N] [--worker-cpus N] [--worker-gpus N] ...
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/local_stack.py" cluster start "$@"
